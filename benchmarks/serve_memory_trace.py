"""Run `mmlm serve` under tracemalloc and write what grows: the soak test's `--trace-memory` (not a benchmark).

    python benchmarks/serve_memory_trace.py OUT_JSONL INTERVAL_S -- serve --model ... (the `mmlm` arguments)

Tracing starts once the server accepts connections on its --port, so start-up (imports, loading the models)
runs untraced and at full speed. Then a daemon thread in the server process writes one JSON line per
INTERVAL_S: RSS; glibc's heap over all arenas (malloc_info: held from the system, free inside it, the number
of arenas); the bytes tracemalloc traces and its own overhead; and, against the first line, the source lines
whose traced memory grew most and the object types whose live count (gc) grew most.

A leak in Python objects shows as a line that grows every interval while RSS follows it; RSS that grows while
the traced bytes and glibc's in-use bytes stay flat is memory glibc keeps (freed but held, or new arenas).
Environment: `MMLM_TRIM=1` calls malloc_trim(0) after each line's RSS is read and records RSS after it (how
much glibc gives back); `MMLM_TRACEMALLOC=0` leaves tracemalloc off, for RSS and heap figures at full speed
(tracing slows the server several times over, so a traced run's latency means nothing).
"""

import ctypes
import gc
import json
import os
import re
import runpy
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

TOP = 12
FRAMES = 4  # enough to see which mmlm call allocated under a library frame; "where" lists the newest first


def rss_mib() -> float:
    """Return this process's resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def heap(libc) -> dict[str, float]:
    """Return glibc's heap over all arenas in MiB (malloc_info's totals): held from the system, free inside it,
    mmapped blocks, and the number of arenas (each thread that mallocs may get its own, up to 8 per core)."""
    with tempfile.NamedTemporaryFile() as tmp:
        stream = libc.fopen(tmp.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        xml = Path(tmp.name).read_text()
    totals = dict(
        re.findall(r'<(?:total|system) type="(\w+)"[^>]* size="(\d+)"', xml[xml.rfind("</heap>") :])
    )
    mib = {k: int(v) / 2**20 for k, v in totals.items()}
    return {"arenas": xml.count("<heap "), "held_mib": mib["current"], "free_held_mib": mib["fast"] + mib["rest"],
            "mmap_mib": mib["mmap"]}  # fmt: skip


def type_counts() -> Counter:
    """Return the live objects gc tracks, counted by type name."""
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def growth(snapshot, types: Counter, first_snapshot, first_types: Counter) -> dict[str, list]:
    """Return the source lines (by traceback) whose traced memory grew most, and the types whose count did."""
    lines = [{"kib": round(s.size_diff / 1024, 1), "count": s.count_diff,
              "where": [f"{f.filename.split('/site-packages/')[-1]}:{f.lineno}" for f in reversed(s.traceback)]}
             for s in snapshot.compare_to(first_snapshot, "traceback")[:TOP]]  # fmt: skip
    return {"lines": lines, "types": (types - first_types).most_common(TOP)}


def wait_for_port(port: int) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:`port`."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)


def watch(out: Path, interval: float, port: int) -> None:
    """Once the server listens, trace; write one JSON line per interval: RSS, traced bytes, heap, and growth."""
    wait_for_port(port)
    python_objects = os.environ.get("MMLM_TRACEMALLOC") != "0"
    if python_objects:
        tracemalloc.start(FRAMES)
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
    trim = os.environ.get("MMLM_TRIM") == "1"
    first, start = None, time.monotonic()
    with out.open("w") as file:
        while True:
            time.sleep(interval)
            row = {"t_s": round(time.monotonic() - start, 1), "rss_mib": round(rss_mib(), 2),
                   **{k: round(v, 2) for k, v in heap(libc).items()}}  # fmt: skip
            if trim:
                libc.malloc_trim(0)
                row["rss_after_trim_mib"] = round(rss_mib(), 2)
            if python_objects:
                row["traced_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 3)
                row["tracemalloc_own_mib"] = round(tracemalloc.get_tracemalloc_memory() / 2**20, 3)
                snapshot, types = tracemalloc.take_snapshot(), type_counts()
                if first is None:
                    first = snapshot, types
                else:
                    row.update(growth(snapshot, types, *first))
            file.write(json.dumps(row) + "\n")
            file.flush()


def main() -> None:
    """Start the watcher thread, then run `mmlm` with the arguments after `--` (which must name --port)."""
    out, interval, dashes, *mmlm_args = sys.argv[1:]
    if dashes != "--":
        raise SystemExit("usage: serve_memory_trace.py OUT_JSONL INTERVAL_S -- serve ...")
    port = int(mmlm_args[mmlm_args.index("--port") + 1])
    threading.Thread(target=watch, args=(Path(out), float(interval), port), daemon=True).start()
    sys.argv = ["mmlm", *mmlm_args]
    runpy.run_module("mmlm", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
