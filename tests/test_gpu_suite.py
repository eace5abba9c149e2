"""benchmarks/gpu_suite.py starts and every section runs: its `--cpu-smoke` run, as a subprocess with this venv's
python, at tiny shapes on CPU.

The figures of a smoke run mean nothing and are not checked against any value; what is checked is the shape of
the report the GPU run will give: every section present, every correctness check ok with a numeric
difference, every speed line with positive rates (and ratios where both sides ran), stdout's JSON lines equal
to DIR/gpu.jsonl, and a non-zero exit status when a check fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from mmlm.inference.base import CacheKind

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "correctness", "clip_train", "clip_embed", "vlm_decode", "serve")
RATES = ("samples_per_s", "images_per_s", "decode_tok_s", "requests_per_s")


def run_suite(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run gpu_suite.py --cpu-smoke --out `out`; return the finished process and its stdout's JSON lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--cpu-smoke", "--out", str(out), *options],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return done, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, list[dict], Path]:
    """One full smoke run: (process, JSON lines, output folder)."""
    out = tmp_path_factory.mktemp("gpu") / "report"
    done, lines = run_suite(out)
    return done, lines, out


@pytest.mark.slow
def test_smoke_run_passes_and_reports_every_section(smoke):
    done, lines, out = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line["section"] for line in lines][-1] == "total"
    assert {line["section"] for line in lines} == {*SECTIONS, "total"}
    assert all({"section", "name", "device", "dtype"} <= set(line) for line in lines)
    assert not [line for line in lines if "error" in line or line.get("skipped") == "time budget"]
    assert (out / "gpu.jsonl").read_text() == done.stdout


@pytest.mark.slow
def test_smoke_correctness_checks_are_ok_with_numeric_differences(smoke):
    checks = [line for line in smoke[1] if line["section"] == "correctness"]
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
    for line in checks:
        assert line["ok"] is True, line
        if line["name"] != "write_tiny_models":
            difference = line.get("max_abs_diff", line.get("positions_differ"))
            assert isinstance(difference, int | float) and difference <= line.get("tolerance", 0), line


@pytest.mark.slow
def test_smoke_speed_lines_carry_positive_rates_and_ratios(smoke):
    speed = [line for line in smoke[1] if line["section"] in SECTIONS[2:] and "skipped" not in line]
    measured = [line for line in speed if any(rate in line for rate in RATES)]
    assert {line["section"] for line in measured} == set(SECTIONS[2:])
    for line in measured:
        rate = next(line[rate] for rate in RATES if rate in line)
        assert 0 < rate["min"] <= rate["median"] <= rate["max"], line
    ratios = [value for line in speed for key, value in line.items() if key.startswith("ratio")]
    assert len(ratios) >= 4 and all(r > 0 for r in ratios)  # embed, decode (two references), serve
    skipped = [line for line in smoke[1] if "skipped" in line]
    assert all(line["skipped"] == "open_clip not installed" for line in skipped)


@pytest.mark.slow
def test_a_broken_check_fails_the_run(tmp_path):
    done, lines = run_suite(tmp_path / "report", "--sections", "correctness", "--inject-mismatch")
    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line for line in lines if line["section"] == "correctness" and line.get("ok") is False]
    assert {line["name"] for line in failed} >= {
        "clip/embeddings",
        "llama/logits",
        "llava/train_steps_vs_cpu",
    }
    assert lines[-1]["failed_checks"]


def test_a_spent_budget_skips_every_section(tmp_path):
    done, lines = run_suite(tmp_path / "report", "--budget-s", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(line["section"], line.get("skipped")) for line in lines[:-1]] == [
        (section, "time budget") for section in SECTIONS
    ]
