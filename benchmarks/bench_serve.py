"""Load test of `mmlm serve` on loopback: concurrent chat clients, with the engine's batching on and off.

Phase 1 starts `mmlm serve --model MODEL` twice in subprocesses, batching on and off, and loads them in
--rounds interleaved rounds, the order reversing every round (benchmarks/timing.py), so drift on a shared
machine lands on both sides: each round runs N clients for T seconds, each sending chat requests (one
shapes-world image as a data URL, a question, greedy, max_tokens) back to back. Each round prints requests,
errors, p50/p99 latency, requests/s and generated tokens/s (from `usage`); each side then prints the median
and min-max spread over its rounds, and the last line the ratio of the medians of requests/s.
Phase 2 overfills the queue on purpose (many clients, a small --max-queue): every response must be a 200 or a
429 with Retry-After; a 5xx or a dropped connection counts as a failure.

    .venv/bin/python benchmarks/bench_serve.py --model runs/demo/vlm --clients 16 --seconds 20
    .venv/bin/python benchmarks/bench_serve.py --quick    # the tests' tiny VLM, 1 s a run: checks that it runs
"""

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from timing import alternating_rounds, ratio_of_medians, spread

MODEL_ID = "mmlm-demo"
# --quick serves the tests' tiny VLM checkpoint, so a run check needs no `make demo`
QUICK_MODEL = Path(__file__).resolve().parents[1] / "tests/fixtures/checkpoints/llava_vlm"


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url() -> str:
    """Return a shapes-world image (the README's "cake" example) as a PNG data URL."""
    from mmlm.data.synthetic import shapes
    from mmlm.recipes.demo_vlm import example_scene

    buffer = io.BytesIO()
    shapes.render(example_scene(), 32).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(
    model: str,
    port: int,
    extra: list[str],
    log: Path | None = None,
    launcher: tuple[str, ...] = ("-m", "mmlm"),
) -> subprocess.Popen:
    """Start `mmlm serve` and wait until /health answers; its stderr goes to `log` (a long run fills a pipe).

    `launcher` is what python runs in place of `-m mmlm` (soak_serve.py's --trace-memory wraps the server).
    """
    cmd = [sys.executable, *launcher, "serve", "--model", model, "--model-name", MODEL_ID, "--port", str(port),
           *extra]  # fmt: skip
    stderr = log.open("wb") if log is not None else subprocess.PIPE
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ})

    def said() -> str:
        return (log.read_bytes() if log is not None else server.stderr.read()).decode()[-2000:]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
        if server.poll() is not None:
            raise SystemExit(f"mmlm serve exited: {said()}")
    server.kill()
    raise SystemExit("mmlm serve did not answer /health within 120 s")


async def client_loop(url: str, body: dict, until: float, out: list) -> None:
    """Send requests back to back until `until`; append (status, seconds, completion tokens or None)."""
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < until:
            start = time.perf_counter()
            try:
                r = await http.post(url, json=body)
                tokens = r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None
                out.append((r.status_code, time.perf_counter() - start, tokens, r.headers.get("retry-after")))
            except httpx.HTTPError as error:  # a dropped connection or a timeout: a failure
                out.append((f"error: {type(error).__name__}", time.perf_counter() - start, None, None))


def run_load(port: int, clients: int, seconds: float, max_tokens: int) -> list:
    """Run `clients` concurrent clients for `seconds`; return every response's record."""
    body = {"model": MODEL_ID, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url()}},
        {"type": "text", "text": "What word is written?"}]}]}  # fmt: skip
    out: list = []
    until = time.monotonic() + seconds

    async def main() -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await asyncio.gather(*(client_loop(url, body, until, out) for _ in range(clients)))

    asyncio.run(main())
    return out


def summary(records: list, seconds: float) -> dict:
    """Return counts by status, latency percentiles of the 200s, requests/s and tokens/s."""
    ok = [r for r in records if r[0] == 200]
    latencies = sorted(r[1] for r in ok)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1

    def pct(q: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)
            if latencies
            else None
        )

    return {
        "requests": len(records), "statuses": statuses, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
        "mean_ms": round(statistics.mean(latencies) * 1000, 1) if latencies else None,
        "requests_per_s": round(len(ok) / seconds, 2),
        "tokens_per_s": round(sum(r[2] or 0 for r in ok) / seconds, 1),
        "failures": sum(1 for r in records if r[0] != 200 and r[0] != 429),
        "429_without_retry_after": sum(1 for r in records if r[0] == 429 and not r[3]),
    }  # fmt: skip


def compare_batching(args: argparse.Namespace) -> None:
    """Serve the model twice (batching on, off), load the two in alternating rounds; print each round and a summary."""
    sides = {"batching on": [], "batching off": ["--no-batching"]}
    ports = {name: free_port() for name in sides}
    servers = {}
    try:
        for name, extra in sides.items():  # both stay up; the idle one waits on an event, using no CPU
            servers[name] = start_server(args.model, ports[name], extra)

        def measure(name: str):
            def one_round() -> dict:
                row = summary(
                    run_load(ports[name], args.clients, args.seconds, args.max_tokens), args.seconds
                )
                print(json.dumps({"round_of": name, **row}), flush=True)
                return row

            return one_round

        rounds = alternating_rounds({name: measure(name) for name in sides}, args.rounds)
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)
    for name, rows in rounds.items():
        print(json.dumps({
            "run": name, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
            "requests": sum(r["requests"] for r in rows), "failures": sum(r["failures"] for r in rows),
            **{key: spread([r[key] for r in rows if r[key] is not None], 2)
               for key in ("requests_per_s", "tokens_per_s", "p50_ms", "p99_ms")},
        }), flush=True)  # fmt: skip
    on, off = ([r["requests_per_s"] for r in rounds[name]] for name in sides)
    print(json.dumps({"batching_on_over_off_requests_per_s": ratio_of_medians(on, off)}), flush=True)


def main() -> None:
    """Compare batching on and off in interleaved rounds, then overfill the queue; print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/vlm")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20, help="load per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side (timing.py)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--overfill-clients", type=int, default=64)
    parser.add_argument("--overfill-queue", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="the tests' tiny VLM, 1 s a run, few clients")
    args = parser.parse_args()
    if args.quick:
        args.model, args.clients, args.seconds, args.max_tokens, args.rounds = str(QUICK_MODEL), 2, 1.0, 4, 2
        args.overfill_clients, args.overfill_queue = 4, 1
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no model there (make demo writes runs/demo/vlm)")
    compare_batching(args)
    port = free_port()
    server = start_server(args.model, port, ["--max-queue", str(args.overfill_queue)])
    try:
        records = run_load(port, args.overfill_clients, args.seconds, args.max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"run": "overfill", "clients": args.overfill_clients, "seconds": args.seconds,
                      **summary(records, args.seconds)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
