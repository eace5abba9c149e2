PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch==2.13.0 is pinned first so pip takes the CPU wheel on disk instead of a 5 GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/mmlm demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: install lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/bench_clip_embed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
