PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BENCH_VENV := .bench-env

.PHONY: install install-dev install-test demo test lint bench clean

# `make install` sets up only what `make demo` needs: the virtualenv, torch and mmlm's own dependencies.
# `make install-dev` adds the Python packages of the tests, lint and benchmarks (the [dev] extra: pytest, ruff,
# import-linter, transformers as the parity reference, ...). `make install-test` (a step of `make test`) adds
# those and the system programs the tests use, as package:program pairs;
# scripts/system_packages.sh installs the missing ones as root, else prints the apt-get command. Each is optional
# for mmlm itself: java runs the COCO caption PTB tokenizer (mmlm.eval.captioning), tesseract reads the text in
# images for `mmlm eval vlm --ocr` (mmlm.processing.ocr), chromium runs the serve web-page test
# (tests/test_serve_browser.py), espeak-ng speaks the real speech of the log-mel parity tests (tests/test_audio.py)
# and of `mmlm demo --modality audio`.
# Without one, its tests skip; with CI=true (.ci/run) they fail instead, naming the program (tests/ci_skips.py).
SYSTEM_PACKAGES := default-jre-headless:java tesseract-ocr:tesseract chromium:chromium espeak-ng:espeak-ng

install: $(STAMP)

install-dev: $(DEV_STAMP)

install-test: install-dev
	sh scripts/system_packages.sh $(SYSTEM_PACKAGES)

# torch==2.13.0 is pinned first so pip takes the CPU wheel on disk instead of a 5 GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	# CLIP_benchmark is the reference for the metric parity tests; its metric modules need only
	# torch, tqdm and scikit-learn, so its heavy dependencies are left out.
	$(BIN)/pip install -q --no-deps "clip-benchmark==1.6.2"
	# lmms-eval's task files (VQA processor, ChartQA, POPE, MMMU) and LAVIS's copy of the official VQA
	# vqaEval.py are the references of the VQA/ChartQA/POPE/MMMU parity tests; those files need only the
	# standard library and numpy, and the tests load them one by one, so the packages' dependencies are left out.
	$(BIN)/pip install -q --no-deps "lmms-eval==0.7.3" "salesforce-lavis==1.0.2"
	touch $(DEV_STAMP)

demo: install
	$(BIN)/mmlm demo

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

# One test process per core (TEST_WORKERS, default 2), each with one torch thread: the suite's models are
# small, so two single-threaded processes finish it in about half the time of one process using both cores
# (on the 2-core machine, from a clean clone: the tests 265 s against 555 s, the whole `make test` 5.5
# against 10.8 min).
TEST_WORKERS ?= 2
test: install-test lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS)

bench: install-dev
	$(BIN)/python benchmarks/bench_clip_embed.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Reference libraries for parity benchmarks (open_clip needs torchvision, which mmlm itself must not need).
# torch 2.14.1 / torchvision 0.29.1 are a matched pair on this machine's disk (~5.5 GB CUDA build).
.PHONY: bench-env
bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: pyproject.toml
	test -d $(BENCH_VENV) || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BENCH_VENV)/bin/pip install -q open_clip_torch transformers
	$(BENCH_VENV)/bin/pip install -q scikit-image  # the photographs of bench_clip_small_data.py's real captioned set
	$(BENCH_VENV)/bin/pip install -q -e .
	touch $@

# open_clip for benchmarks/gpu_suite.py on a GPU machine without network: open_clip_torch and its two pure-Python
# dependencies that such a machine lacks (ftfy, wcwidth), unpacked into .gpu-wheels/ to carry along with the
# source; `python3 benchmarks/gpu_suite.py --wheels .gpu-wheels` imports them from there (docs/gpu.md).
GPU_WHEELS := .gpu-wheels

.PHONY: gpu-wheels
gpu-wheels: install
	rm -rf $(GPU_WHEELS)
	$(BIN)/python -m pip download -q --no-deps -d $(GPU_WHEELS)/downloads open_clip_torch ftfy wcwidth
	for wheel in $(GPU_WHEELS)/downloads/*.whl; do $(BIN)/python -m zipfile -e $$wheel $(GPU_WHEELS); done
	rm -rf $(GPU_WHEELS)/downloads
