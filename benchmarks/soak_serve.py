"""Soak test of `mmlm serve`: many clients for minutes against one server; errors, latency and RSS must stay flat.

Starts `mmlm serve` on 127.0.0.1 with the tests' tiny VLM for chat, the tiny CLIP for embeddings and search,
and an index of a few shapes-world images built in a temporary folder. N clients (default 32) send requests
back to back for the duration (default 600 s), each picking in turn from a mix: chat (non-streaming), chat
streamed over server-sent events (the stream must end in [DONE]), text embeddings, and a text search
followed by the first hit's thumbnail. Every non-200, dropped connection or unfinished stream is an error.

Per window (default one minute) it records requests, errors, p50/p99 latency and the server's peak RSS
(from /proc/PID/status, sampled every second). The verdict passes when there are 0 errors, p99 is flat
(the last window's p99 at most P99_GROWTH times the first window after warm-up) and RSS is flat (the last
window's RSS at most RSS_GROWTH above the first window after warm-up). The first window is the warm-up.

    .venv/bin/python benchmarks/soak_serve.py                       # 32 clients, 600 s, 60 s windows
    .venv/bin/python benchmarks/soak_serve.py --seconds 60          # a short run
    .venv/bin/python benchmarks/soak_serve.py --quick               # 4 clients, 10 s: checks that it runs
    .venv/bin/python benchmarks/soak_serve.py --seconds 120 --trace-memory trace.jsonl   # what grows, and where

--trace-memory runs the server under benchmarks/serve_memory_trace.py, which writes, every --window, its RSS,
glibc's heap over all arenas, and (tracemalloc) the Python source lines and object types that grew since the
first window. Tracing slows the server, so a traced run's latency means nothing; MMLM_TRACEMALLOC=0 keeps the
RSS and heap figures at full speed, MMLM_TRIM=1 adds malloc_trim(0) after each window's figures.

It exits 1 when the verdict fails (not with --quick, whose few seconds say nothing about flatness).
"""

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_serve import MODEL_ID, QUICK_MODEL, free_port, image_url, start_server

CLIP_MODEL = Path(__file__).resolve().parents[1] / "tests/fixtures/checkpoints/clip"
EMBED_ID = "tiny-clip"
P99_GROWTH = 1.5  # shared CPUs jitter; a leak or a growing queue shows as a steady climb past this
RSS_GROWTH = 0.05
KINDS = ("chat", "chat_stream", "embeddings", "search")


def rss_bytes(pid: int) -> int:
    """Return a process's resident set size from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build_shapes_index(folder: Path) -> Path:
    """Write a few shapes-world images and index them with the tiny CLIP; return the index folder."""
    import mmlm
    from mmlm.data.synthetic import shapes
    from mmlm.index import build_index
    from mmlm.recipes.demo_vlm import example_scene

    images = folder / "images"
    images.mkdir()
    for size in (32, 48, 64, 80, 96, 112):
        shapes.render(example_scene(), size).save(images / f"scene_{size}.png")
    build_index(mmlm.load(CLIP_MODEL), CLIP_MODEL, images, folder / "index")
    return folder / "index"


async def one_request(http: httpx.AsyncClient, kind: str, chat: dict) -> None:
    """Send one request of `kind`; raise on anything but a complete 200."""
    if kind == "chat":
        (await http.post("/v1/chat/completions", json=chat)).raise_for_status()
    elif kind == "chat_stream":
        async with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
            response.raise_for_status()
            lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
        if not lines or lines[-1].strip() != "data: [DONE]":
            raise RuntimeError("the stream ended without [DONE]")
    elif kind == "embeddings":
        body = {"model": EMBED_ID, "input": ["a red circle", "two blue squares"]}
        (await http.post("/v1/embeddings", json=body)).raise_for_status()
    else:
        response = await http.post("/v1/search", json={"model": EMBED_ID, "text": "a cake", "k": 3})
        response.raise_for_status()
        first = response.json()["data"][0]["id"]
        (await http.get(f"/v1/search/thumbnail/{first}")).raise_for_status()


async def client(url: str, number: int, chat: dict, until: float, out: list) -> None:
    """Send the mix back to back until `until`; append (finish time, kind, seconds, error or None)."""
    kinds = itertools.islice(itertools.cycle(KINDS), number % len(KINDS), None)  # clients start staggered
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            kind, start = next(kinds), time.monotonic()
            error = None
            try:
                await one_request(http, kind, chat)
            except (httpx.HTTPError, RuntimeError, KeyError, IndexError, ValueError) as failure:
                error = f"{type(failure).__name__}: {str(failure)[:200]}"
            out.append((time.monotonic(), kind, time.monotonic() - start, error))


async def sample_rss(pid: int, until: float, out: list) -> None:
    """Append (time, RSS bytes) of the server every second until `until`."""
    while time.monotonic() < until:
        out.append((time.monotonic(), rss_bytes(pid)))
        await asyncio.sleep(1.0)


def windows(records: list, rss: list, start: float, seconds: float, window: float) -> list[dict]:
    """Return per-window requests, errors, p50/p99 ms and peak RSS MiB."""
    rows = []
    for w in range(max(1, int(round(seconds / window)))):
        lo, hi = start + w * window, start + (w + 1) * window
        inside = [r for r in records if lo <= r[0] < hi]
        ok = sorted(r[2] for r in inside if r[3] is None)
        rows.append({
            "window": w, "requests": len(inside), "errors": sum(r[3] is not None for r in inside),
            "p50_ms": round(1000 * statistics.median(ok), 1) if ok else None,
            "p99_ms": round(1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1) if ok else None,
            "rss_mib": round(max((b for t, b in rss if lo <= t < hi), default=0) / 2**20, 1),
        })  # fmt: skip
    return rows


def verdict(rows: list[dict], errors: int) -> dict:
    """Return whether the run passed: no errors, and p99 and RSS flat after the warm-up window."""
    after = rows[1:] if len(rows) > 1 else rows
    first, last = after[0], after[-1]
    p99_growth = last["p99_ms"] / first["p99_ms"] if first["p99_ms"] and last["p99_ms"] else None
    rss_growth = last["rss_mib"] / first["rss_mib"] - 1 if first["rss_mib"] else None
    checks = {
        "no_errors": errors == 0,
        "p99_flat": p99_growth is not None and p99_growth <= P99_GROWTH,
        "rss_flat": rss_growth is not None and rss_growth <= RSS_GROWTH,
    }
    return {
        "pass": all(checks.values()), **checks,
        "p99_growth": None if p99_growth is None else round(p99_growth, 3),
        "rss_growth": None if rss_growth is None else round(rss_growth, 4),
    }  # fmt: skip


def main() -> None:
    """Run the soak and print per-window JSON lines, a summary and the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--window", type=float, default=60, help="seconds per reported window")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 clients, 10 s, 2.5 s windows")
    parser.add_argument(
        "--trace-memory", type=Path, help="write the server's memory growth here (JSON lines)"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.window = 4, 10.0, 2.5
    chat = {"model": MODEL_ID, "max_tokens": args.max_tokens, "temperature": 0, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                        {"type": "text", "text": "What is in the picture?"}]}]}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        index = build_shapes_index(Path(tmp))
        port = free_port()
        extra = ["--embed-model", str(CLIP_MODEL), "--embed-model-name", EMBED_ID, "--index", str(index),
                 "--max-queue", str(4 * args.clients)]  # fmt: skip
        launcher = ("-m", "mmlm")
        if args.trace_memory:
            trace = Path(__file__).with_name("serve_memory_trace.py")
            launcher = (str(trace), str(args.trace_memory.resolve()), str(args.window), "--")
        server = start_server(str(QUICK_MODEL), port, extra, log=Path(tmp) / "serve.log", launcher=launcher)
        records: list = []
        rss: list = []
        try:
            start = time.monotonic()
            until = start + args.seconds

            async def run() -> None:
                url = f"http://127.0.0.1:{port}"
                await asyncio.gather(
                    sample_rss(server.pid, until, rss),
                    *(client(url, i, chat, until, records) for i in range(args.clients)),
                )

            asyncio.run(run())
        finally:
            server.terminate()
            server.wait(timeout=60)
    rows = windows(records, rss, start, args.seconds, args.window)
    for row in rows:
        print(json.dumps(row), flush=True)
    errors = [r for r in records if r[3] is not None]
    result = verdict(rows, len(errors))
    print(json.dumps({
        "clients": args.clients, "seconds": args.seconds, "window_s": args.window, "requests": len(records),
        "by_kind": {k: sum(r[1] == k for r in records) for k in KINDS}, "errors": len(errors),
        "first_errors": sorted({r[3] for r in errors})[:5], "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg()[0], "verdict": result,
    }), flush=True)  # fmt: skip
    if not result["pass"] and not args.quick:
        sys.exit(1)


if __name__ == "__main__":
    main()
