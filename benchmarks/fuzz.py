"""Fuzz mmlm's input boundaries at scale: mutated images, audio, video, LLaVA and manifest files, hostile chat
messages through chat templates, and hostile bodies to the server's chat completions endpoint.

Every input must give a result or the one-line InputError (a 4xx from the server): any other exception, a
5xx, an input slower than --hang-seconds or a dead server counts as a failure. Prints one JSON line per target:
inputs run, failures by kind (one example of each saved under --out) and seconds.

    PYTHONPATH=src python benchmarks/fuzz.py --count 10000 --out runs/fuzz
    PYTHONPATH=src python benchmarks/fuzz.py --count 200 --targets image audio
"""

import argparse
import json
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_fuzz import apply_mutations, check_one_line, random_mutations  # noqa: E402
from fixtures_fuzz_server import open_target  # noqa: E402
from mmlm.errors import InputError  # noqa: E402


class Hang(Exception):
    """One input ran past --hang-seconds."""


def _alarm(signum, frame) -> None:
    raise Hang()


def _failure(call, data, folder: Path, hang_seconds: float) -> tuple[str, str] | None:
    signal.setitimer(signal.ITIMER_REAL, hang_seconds)
    try:
        call(data, folder)
    except InputError as error:
        try:
            check_one_line(error)
        except AssertionError as problem:
            return "MultiLineInputError", str(problem)
    except Hang:
        return "Hang", f"over {hang_seconds} s"
    except Exception as error:  # every other type is the failure being counted
        return type(error).__name__, "".join(traceback.format_exception(error))[-4000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None


def fuzz_target(name: str, seeds: dict, call, count: int, out: Path, hang_seconds: float, seed: int) -> dict:
    """Run `count` mutated inputs through one target; return its summary line."""
    rng = random.Random(f"{seed}:{name}")
    names = sorted(seeds)
    failures: dict[str, int] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(count):
            base = seeds[names[i % len(names)]]
            edits = random_mutations(rng, len(base))
            data = apply_mutations(base, edits)
            failure = _failure(call, data, Path(scratch), hang_seconds)
            if failure is None:
                continue
            kind, detail = failure
            detail = f"seed {names[i % len(names)]}, mutations {edits}\n{detail}"
            failures[kind] = failures.get(kind, 0) + 1
            if failures[kind] == 1:
                (out / f"{name}-{kind}.input").write_bytes(data)
                (out / f"{name}-{kind}.txt").write_text(detail)
    seconds = time.perf_counter() - start
    return {"target": name, "inputs": count, "failures": failures, "seconds": round(seconds, 1)}


def main() -> None:
    """Parse arguments, fuzz each target, print one JSON line per target."""
    targets = ("image", "audio", "video", "llava", "manifest", "chat_template", "server")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--targets", nargs="+", choices=targets, default=list(targets))
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz"), help="one failing input per kind")
    parser.add_argument("--hang-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 inputs per target: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.count = 20
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _alarm)
    for name in args.targets:
        with open_target(name) as (seeds, call):
            print(
                json.dumps(fuzz_target(name, seeds, call, args.count, args.out, args.hang_seconds, args.seed))
            )


if __name__ == "__main__":
    main()
