"""benchmarks/gpu_suite.py starts and every section runs: its `--cpu-smoke` run, as a subprocess with this venv's
python, at tiny shapes on CPU.

The figures of a smoke run mean nothing and are not checked against any value; what is checked is the shape of
the report the GPU run will give: every section present, every correctness check ok with a numeric
difference, every speed line with positive rates (and ratios where both sides ran), stdout's JSON lines equal
to DIR/gpu.jsonl, and a non-zero exit status when a check fails.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

from mmlm.inference.base import CacheKind

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "correctness", "clip_train", "clip_embed", "vlm_decode", "serve")
RATES = ("samples_per_s", "images_per_s", "decode_tok_s", "requests_per_s")


def start_suite(out: Path, *options: str) -> subprocess.Popen:
    """Start gpu_suite.py --cpu-smoke --out `out` with this venv's python."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--cpu-smoke", "--out", str(out), *options],
        cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str, str, list[dict], Path]]:
    """Two runs side by side (each is mostly one thread): the whole smoke suite, and the correctness checks with
    a mismatch injected. Each: (exit status, stdout, stderr, JSON lines, output folder)."""
    root = tmp_path_factory.mktemp("gpu")
    options = {"smoke": [], "mismatch": ["--sections", "correctness", "--inject-mismatch"]}
    started = {name: start_suite(root / name / "report", *extra) for name, extra in options.items()}
    finished = {}
    for name, proc in started.items():
        stdout, stderr = proc.communicate(timeout=240)
        lines = [json.loads(line) for line in stdout.splitlines()]
        finished[name] = (proc.returncode, stdout, stderr, lines, root / name / "report")
    return finished


@pytest.fixture(scope="module")
def smoke(runs) -> tuple[int, str, str, list[dict], Path]:
    """The full smoke run."""
    return runs["smoke"]


@pytest.mark.slow
def test_smoke_run_passes_and_reports_every_section(smoke):
    status, stdout, stderr, lines, out = smoke
    assert status == 0, stderr[-3000:]
    assert [line["section"] for line in lines][-1] == "total"
    assert {line["section"] for line in lines} == {*SECTIONS, "total"}
    assert all({"section", "name", "device", "dtype"} <= set(line) for line in lines)
    assert not [line for line in lines if "error" in line or line.get("skipped") == "time budget"]
    assert (out / "gpu.jsonl").read_text() == stdout


@pytest.mark.slow
def test_smoke_correctness_checks_are_ok_with_numeric_differences(smoke):
    checks = [line for line in smoke[3] if line["section"] == "correctness"]
    names = {line["name"] for line in checks}
    for family in ("clip", "siglip"):
        assert {(line["dtype"]) for line in checks if line["name"] == f"{family}/embeddings"} == {
            "fp32",
            "bf16",
        }
    assert {"llama/logits", "llava/logits", "llama/greedy_tokens", "llava/greedy_tokens",
            "clip/train_steps_vs_cpu", "llava/train_steps_vs_cpu"} <= names  # fmt: skip
    for kind in get_args(CacheKind):
        assert {f"llama/generate_cache_{kind}", f"llava/generate_cache_{kind}"} <= names
    cuda = next(line for line in checks if line["name"] == "pytest_cuda")
    assert cuda["counts"]["collected"] >= 2 and "test_graph_decode.py" in cuda["files"]  # collected, not run
    for line in checks:
        assert line["ok"] is True, line
        if line["name"] not in ("write_tiny_models", "pytest_cuda"):
            difference = line.get("max_abs_diff", line.get("positions_differ"))
            assert isinstance(difference, int | float) and difference <= line.get("tolerance", 0), line


@pytest.mark.slow
def test_smoke_speed_lines_carry_positive_rates_and_ratios(smoke):
    speed = [line for line in smoke[3] if line["section"] in SECTIONS[2:] and "skipped" not in line]
    measured = [line for line in speed if any(rate in line for rate in RATES)]
    assert {line["section"] for line in measured} == set(SECTIONS[2:])
    for line in measured:
        rate = next(line[rate] for rate in RATES if rate in line)
        assert 0 < rate["min"] <= rate["median"] <= rate["max"], line
    ratios = [value for line in speed for key, value in line.items() if key.startswith("ratio")]
    assert len(ratios) >= 4 and all(r > 0 for r in ratios)  # embed, decode (two references), serve
    skipped = [line for line in smoke[3] if "skipped" in line]
    assert all(line["skipped"] == "open_clip not installed" for line in skipped)


@pytest.mark.slow
def test_a_broken_check_fails_the_run(runs):
    status, _, stderr, lines, _ = runs["mismatch"]
    assert status == 1, stderr[-3000:]
    failed = [line for line in lines if line["section"] == "correctness" and line.get("ok") is False]
    assert {line["name"] for line in failed} >= {
        "clip/embeddings",
        "llama/logits",
        "llava/train_steps_vs_cpu",
    }
    assert lines[-1]["failed_checks"]


def test_a_spent_budget_skips_every_section(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_suite import SECTIONS as RUNS
        from gpu_suite import Budget, Suite, run_sections
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    stream = io.StringIO()
    suite = Suite(tmp_path, stream, torch.device("cpu"), smoke=True, budget=Budget(0))
    run_sections(suite, list(RUNS))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["section"], line.get("skipped")) for line in lines] == [
        *((section, "time budget") for section in SECTIONS),
        ("total", None),
    ]
    assert (tmp_path / "gpu.jsonl").read_text() == stream.getvalue()
