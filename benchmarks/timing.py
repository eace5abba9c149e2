"""Timing shared by the benchmarks: interleaved rounds, alternating which side goes first, and their spread.

A shared machine drifts: another job starts, the CPU clocks down. Timing one side's rounds and then the
other's puts the drift on one side only, and always running the same side first gives it the warmer (or
colder) caches. So every benchmark that compares runs them round by round, reversing the order each round,
and reports each side's median with its min-max spread, and the ratio of medians.
"""

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# "wall" is what a user waits; "cpu" is the calling thread's CPU time, which another job on the same cores does
# not inflate (it only delays it). With one torch thread all of a decode step's work runs on the calling thread,
# so its CPU time is what the step would take on an idle machine, give or take cache effects.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = [time.perf_counter]


def use_clock(name: str) -> None:
    """Make `now()` read the named clock of CLOCKS for the rest of the run."""
    _clock[0] = CLOCKS[name]


def now() -> float:
    """Return the chosen clock's reading in seconds (wall clock unless `use_clock("cpu")`)."""
    return _clock[0]()


def alternating_rounds(measures: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Return each side's measurements over `rounds` rounds, in which the sides run in turn, reversed every other round."""
    names = list(measures)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            results[name].append(measures[name]())
    return results


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Return each side's wall-clock seconds per call over `rounds` alternating rounds, after `warmup` untimed calls each."""
    for _ in range(warmup):  # caches, FFT plans, the allocator
        for run in runs.values():
            run()

    def timed(run: Callable[[], object]) -> Callable[[], float]:
        def measure() -> float:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

        return measure

    return alternating_rounds({name: timed(run) for name, run in runs.items()}, rounds)


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    """Return the median, min and max of `values`, rounded to `digits` decimals."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def rate_spread(seconds: list[float], items: float, digits: int = 1) -> dict[str, float]:
    """Return the median, min and max of `items / s` over the timed seconds: items per second."""
    return spread([items / s for s in seconds], digits)


def ratio_of_medians(numerator: list[float], denominator: list[float], digits: int = 3) -> float:
    """Return median(numerator) / median(denominator), rounded."""
    return round(statistics.median(numerator) / statistics.median(denominator), digits)
