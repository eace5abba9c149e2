"""The server's counters, histograms and gauges, written in the Prometheus text exposition format (0.0.4).

Kept by hand rather than with prometheus_client: a handful of series, no extra dependency, and the engine
is their only writer. Safe to update from the model thread and read from the event loop (one lock).
"""

import math
import threading
import time
from collections import deque

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def format_labels(labels: dict[str, str]) -> str:
    """Return `{k="v",...}` with values escaped as the exposition format asks (or "" for no labels)."""
    if not labels:
        return ""
    escaped = (f'{k}="{escape_label(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


def escape_label(value: str) -> str:
    """Return a label value with backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """Return a sample value as Prometheus writes it (+Inf, integers without a fraction)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    """Cumulative bucket counts, sum and count of observed values, per label set."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.series: dict[tuple[tuple[str, str], ...], list[float]] = {}  # labels -> [counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        """Add one observation."""
        key = tuple(sorted(labels.items()))
        row = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                row[i] += 1
        row[-2] += value
        row[-1] += 1

    def lines(self, name: str) -> list[str]:
        """Return the exposition lines of every series: _bucket{le}, _sum and _count."""
        out = []
        for key, row in sorted(self.series.items()):
            labels = dict(key)
            for bound, count in zip(
                (*self.buckets, math.inf), (*row[: len(self.buckets)], row[-1]), strict=True
            ):
                out.append(
                    f"{name}_bucket{format_labels({**labels, 'le': format_value(bound)})} {format_value(count)}"
                )
            out.append(f"{name}_sum{format_labels(labels)} {format_value(row[-2])}")
            out.append(f"{name}_count{format_labels(labels)} {format_value(row[-1])}")
        return out


class ServerMetrics:
    """Requests by kind and outcome, their latency, batch sizes and generated tokens (total and recent rate)."""

    def __init__(self, rate_window_s: float = 10.0) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.request_seconds = Histogram(REQUEST_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.generated_tokens = 0
        self.rate_window_s = rate_window_s
        self.recent_tokens: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps
        self.recent_seconds: deque[float] = deque(maxlen=64)  # latencies of recent successful requests

    def request(self, kind: str, status: str, seconds: float) -> None:
        """Count one finished request (status: ok, error, timeout, cancelled, stalled, rejected) and its latency."""
        with self.lock:
            self.requests[kind, status] = self.requests.get((kind, status), 0) + 1
            if status != "rejected":
                self.request_seconds.observe(seconds, kind=kind)
            if status == "ok":
                self.recent_seconds.append(seconds)

    def batch(self, kind: str, size: int) -> None:
        """Record the size of one model batch."""
        with self.lock:
            self.batch_size.observe(size, kind=kind)

    def tokens(self, count: int) -> None:
        """Add generated tokens."""
        if count:
            with self.lock:
                now = time.monotonic()
                self.generated_tokens += count
                self.recent_tokens.append((now, count))
                # forget here, not only when /metrics is read: a server nobody scrapes would keep every step
                self._forget_tokens_before(now - self.rate_window_s)

    def tokens_per_second(self) -> float:
        """Return tokens generated per second over the last `rate_window_s` seconds."""
        with self.lock:
            self._forget_tokens_before(time.monotonic() - self.rate_window_s)
            return sum(n for _, n in self.recent_tokens) / self.rate_window_s

    def _forget_tokens_before(self, start: float) -> None:
        while self.recent_tokens and self.recent_tokens[0][0] < start:
            self.recent_tokens.popleft()

    def mean_request_seconds(self, default: float = 1.0) -> float:
        """Return the mean latency of recent successful requests (or `default` before there are any)."""
        with self.lock:
            return sum(self.recent_seconds) / len(self.recent_seconds) if self.recent_seconds else default

    def render(self, queue_depth: int, running: int) -> str:
        """Return every metric in the Prometheus text format."""
        rate = self.tokens_per_second()
        with self.lock:
            lines = [
                "# HELP mmlm_requests_total Requests finished, by kind and status.",
                "# TYPE mmlm_requests_total counter",
                *(
                    f"mmlm_requests_total{format_labels({'kind': k, 'status': s})} {n}"
                    for (k, s), n in sorted(self.requests.items())
                ),
                "# HELP mmlm_request_seconds Request latency from arrival to last byte, queue wait included.",
                "# TYPE mmlm_request_seconds histogram",
                *self.request_seconds.lines("mmlm_request_seconds"),
                "# HELP mmlm_queue_depth Requests waiting for the model (not yet running).",
                "# TYPE mmlm_queue_depth gauge",
                f"mmlm_queue_depth {queue_depth}",
                "# HELP mmlm_running_requests Generation requests in the decode batch.",
                "# TYPE mmlm_running_requests gauge",
                f"mmlm_running_requests {running}",
                "# HELP mmlm_generated_tokens_total Tokens generated.",
                "# TYPE mmlm_generated_tokens_total counter",
                f"mmlm_generated_tokens_total {self.generated_tokens}",
                f"# HELP mmlm_tokens_per_second Tokens generated per second over the last {self.rate_window_s:g} s.",
                "# TYPE mmlm_tokens_per_second gauge",
                f"mmlm_tokens_per_second {format_value(round(rate, 3))}",
                "# HELP mmlm_batch_size Requests per model call (a decode step counts once).",
                "# TYPE mmlm_batch_size histogram",
                *self.batch_size.lines("mmlm_batch_size"),
            ]
        return "\n".join(lines) + "\n"
