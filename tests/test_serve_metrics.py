"""The server's metrics hold bounded memory however long it runs, and whether or not anyone reads /metrics."""

import pytest

from mmlm.serve import metrics as metrics_module
from mmlm.serve.metrics import ServerMetrics


class Clock:
    """A monotonic clock that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_tokens_stay_within_the_rate_window_when_nobody_scrapes(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics_module.time, "monotonic", clock)
    metrics = ServerMetrics(rate_window_s=10.0)
    for _ in range(5000):  # one decode step every 0.5 s for 2,500 s, /metrics never read
        metrics.tokens(3)
        clock.now += 0.5
    assert len(metrics.recent_tokens) == 21  # the steps of the last 10 s (both ends), not all 5,000
    assert metrics.generated_tokens == 15_000
    assert metrics.tokens_per_second() == 3 * 20 / 10.0  # 0.5 s on: the 20 steps in [now - 10 s, now]


def test_tokens_per_second_counts_only_the_window(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics_module.time, "monotonic", clock)
    metrics = ServerMetrics(rate_window_s=10.0)
    metrics.tokens(50)
    clock.now += 5.0
    metrics.tokens(20)
    metrics.tokens(0)  # a step that made nothing adds nothing
    assert metrics.tokens_per_second() == pytest.approx(7.0)
    clock.now += 6.0  # the first step is now 11 s old
    assert metrics.tokens_per_second() == pytest.approx(2.0)
    assert len(metrics.recent_tokens) == 1
