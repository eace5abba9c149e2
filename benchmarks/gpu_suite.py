"""One command that checks and measures mmlm on a GPU machine: environment, correctness, then speed.

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out runs/gpu --wheels .gpu-wheels   # on the GPU machine
    .venv/bin/python benchmarks/gpu_suite.py --cpu-smoke --out /tmp/gpu   # tiny shapes on CPU: every section runs

Sections, in order (`--sections` picks some): environment, correctness (gpu_checks.py), clip_train, clip_embed,
vlm_decode and serve (gpu_speed.py, gpu_decode.py). Every figure is one JSON line {"section", "name", "device",
"dtype", ...}, printed on stdout and appended to DIR/gpu.jsonl; library output goes to stderr so that stdout
holds the JSON lines alone. A part that raises records {"error": one line} and the suite goes on. Each part
checks the clock first and records {"skipped": "time budget"} once `--budget-s` is spent (the GPU machine is
lent for about 15 minutes, start-up included, so the suite keeps to 8). The exit status is 1 when a correctness
check failed or raised, else 0; speed errors are recorded but do not fail the run.

`--wheels DIR` puts the pure-Python wheels unpacked in DIR (`make gpu-wheels`: open_clip_torch, ftfy, wcwidth)
on sys.path, here and in the worker processes, since the GPU machine has no network.
`--inject-mismatch` perturbs one mmlm weight before the correctness checks, to prove that they can fail.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from gpu_checks import correctness
from gpu_decode import vlm_decode
from gpu_speed import clip_embed, clip_train, serve


class Budget:
    """The suite's wall-clock allowance: what is left of `--budget-s` since the start (after the imports, which
    take some 10 s more)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def spent(self) -> float:
        """Return the seconds since the suite started."""
        return time.monotonic() - self.start

    def left(self) -> float:
        """Return the seconds left before the budget is spent (negative once it is)."""
        return self.seconds - self.spent()


@dataclass
class Suite:
    """What every section needs: where lines go, the device, the sizes (smoke or real), the clock."""

    out: Path
    stream: Any  # the real stdout: library prints were sent to stderr
    device: torch.device
    smoke: bool
    budget: Budget
    inject_mismatch: bool = False
    failed_checks: list[str] = field(default_factory=list)

    def emit(self, record: dict[str, Any]) -> None:
        """Print one JSON line and append the same line to DIR/gpu.jsonl."""
        line = json.dumps(record)
        print(line, file=self.stream, flush=True)
        with (self.out / "gpu.jsonl").open("a") as jsonl:
            jsonl.write(line + "\n")

    def part(
        self,
        section: str,
        name: str,
        dtype: str,
        measure: Callable[[], dict | list[dict]],
        needs_s: float = 0,
    ) -> None:
        """Run one check or measurement unless fewer than `needs_s` seconds of the budget are left (a guess at
        its longest run, so that it does not overrun); emit its line, or one line per dict it returns, each
        naming itself. A correctness line that is not ok, or any error in that section, fails the suite.
        """
        head = {"section": section, "name": name, "device": str(self.device), "dtype": dtype}
        if self.budget.left() <= needs_s:
            self.emit({**head, "skipped": "time budget"})
            return
        try:
            figures = measure()
        except Exception as error:  # one broken part must not hide the others' figures
            figures = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
        for line in figures if isinstance(figures, list) else [figures]:
            self.emit({**head, **line})
            if section == "correctness" and line.get("ok") is not True:
                self.failed_checks.append(f"{line.get('name', name)} ({dtype})")


def environment(suite: Suite) -> None:
    """Emit the versions of torch, transformers and open_clip, and the device's name, capability and bf16."""

    def versions() -> dict[str, Any]:
        try:  # from --wheels on a GPU machine
            import open_clip

            open_clip_version = open_clip.__version__
        except ImportError:
            open_clip_version = None
        cuda = suite.device.type == "cuda"
        return {
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "open_clip": open_clip_version, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(suite.device) if cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability(suite.device)) if cuda else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if cuda else True, "smoke": suite.smoke,
        }  # fmt: skip

    suite.part("environment", "versions", "-", versions)


# each section emits its own lines, in this order
SECTIONS: dict[str, Callable[[Suite], None]] = {
    "environment": environment, "correctness": correctness, "clip_train": clip_train, "clip_embed": clip_embed,
    "vlm_decode": vlm_decode, "serve": serve,
}  # fmt: skip


def add_wheels(folder: str) -> None:
    """Put `folder`, where wheels were unpacked (`make gpu-wheels`), on sys.path and on workers' PYTHONPATH."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"--wheels {folder}: no such folder (make gpu-wheels writes .gpu-wheels/)")
    sys.path.insert(0, str(root.resolve()))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root.resolve()), os.environ.get("PYTHONPATH", "")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder of gpu.jsonl, which each run appends to")
    parser.add_argument("--cpu-smoke", "--quick", dest="smoke", action="store_true",
                        help="tiny shapes on CPU, one short round each: a check that every section runs")  # fmt: skip
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock seconds for the whole suite")
    parser.add_argument("--wheels", help="a folder of unpacked pure-Python wheels to import (open_clip)")
    parser.add_argument(
        "--inject-mismatch",
        action="store_true",
        help="scale mmlm's weights by 1.05 in the checks: they must fail",
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    return args


def run_sections(suite: Suite, names: list[str]) -> None:
    """Run the named sections in SECTIONS' order, then emit the total seconds and the failed checks."""
    for name, run in SECTIONS.items():
        if name in names:  # an error outside the section's own parts becomes its "section" line
            suite.part(name, "section", "-", lambda run=run: run(suite) or [])
    suite.emit({"section": "total", "name": "suite", "device": str(suite.device), "dtype": "-",
                "seconds": round(suite.budget.spent(), 1), "failed_checks": suite.failed_checks})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections in order; return 1 if a correctness check failed, else 0."""
    args = parse_args(argv)
    if args.wheels:
        add_wheels(args.wheels)
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the JSON lines
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: the suite measures a GPU (--cpu-smoke runs it on CPU at tiny shapes)"
        )
    device = torch.device("cpu" if args.smoke else "cuda")
    suite = Suite(out, stream, device, args.smoke, Budget(args.budget_s), args.inject_mismatch)
    run_sections(suite, args.sections)
    return 1 if suite.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
