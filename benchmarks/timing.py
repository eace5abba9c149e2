"""Timing shared by the benchmarks: the median of several timed runs after one warm-up run."""

import statistics
import time
from collections.abc import Callable


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Return the median wall-clock seconds of `repeats` calls of `run`, after one untimed warm-up call."""
    run()  # warm-up: caches, FFT plans, the allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
