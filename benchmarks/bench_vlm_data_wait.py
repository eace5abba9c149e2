"""How long `mmlm train vlm` waits for its data: the data_wait_fraction of metrics.jsonl with 2 workers and with 0.

A LLaVA-format JSONL of a few hundred one-image conversations over 224-px JPEGs (crops of scikit-image's
photographs, written by bench_vlm_data_memory.py) trains the demo VLM's sizes (mmlm.recipes.demo_vlm: a 4-layer
width-128 ViT at 32 px with a conv stem, MLP connector, a 2-layer width-128 LM, BPE of 512, batch 64) with the
connector and LM trained, once per `data.workers` setting, each run in its own process. Each metrics.jsonl record
carries the share of its interval's wall time the loop spent inside `next(batches)`; the script reports, per
setting, the median (min-max) over the records after the warm-up ones (the first batches wait for the workers to
start) and the median samples/s. The target is a median data_wait_fraction <= 0.05 with 2 workers.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_vlm_data_wait.py     # ~2 minutes, 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/bench_vlm_data_wait.py --quick               # seconds
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_vlm_data_memory import write_conversations

# mmlm.recipes.demo_vlm's VLM: its tower, connector and LM sizes, and its batch
MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "heads": 4, "mlp_dim": 512,
               "act": "gelu", "embed_dim": None, "stem": "conv"},
    "lm": {"width": 128, "layers": 2, "heads": 4, "kv_heads": 4, "mlp_dim": 256, "tie_word_embeddings": True},
    "connector": {"kind": "mlp"}, "feature_layers": [-1], "vocab_size": 512,
}  # fmt: skip
TARGET = 0.05


def train(folder: Path, data: Path, workers: int, steps: int, log_every: int, batch: int) -> list[dict]:
    """Train with `workers` data workers in a fresh process; return its metrics.jsonl records."""
    run_dir = folder / f"run-{workers}"
    config = folder / f"train-{workers}.json"
    stage = {"steps": steps, "train": ["connector", "lm"], "data": {"source": str(data)}}
    config.write_text(json.dumps({"model": MODEL, "stages": {"instruct": stage}, "batch_size": batch,
                                  "max_length": 96, "eval_samples": 0, "log_every": log_every, "device": "cpu",
                                  "data": {"workers": workers}, "out_dir": str(run_dir)}))  # fmt: skip
    subprocess.run([sys.executable, "-m", "mmlm", "train", "vlm", "--config", str(config)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(records: list[dict], warmup: int, workers: int) -> dict:
    """Return the data_wait_fraction median (min-max) and median samples/s of the records after `warmup`."""
    kept = records[warmup:]
    waits = [r["data_wait_fraction"] for r in kept]
    return {"workers": workers, "records": len(kept), "steps": kept[-1]["step"] - records[warmup - 1]["step"],
            "data_wait_fraction": {"median": round(statistics.median(waits), 4), "min": round(min(waits), 4),
                                   "max": round(max(waits), 4)},
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in kept), 1)}  # fmt: skip


def main() -> None:
    """Write the data, train once per worker setting, print one JSON line each, then the verdict."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument(
        "--warmup-records", type=int, default=2, help="records left out at the start of each run"
    )
    parser.add_argument("--records", type=int, default=300, help="conversations in the JSONL, one image each")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.log_every, args.warmup_records, args.records, args.batch_size = 6, 2, 1, 24, 8
    print(json.dumps({"model": MODEL, "batch": args.batch_size, "steps": args.steps, "log_every": args.log_every,
                      "records": args.records, "load_1min": round(os.getloadavg()[0], 2)}), flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_conversations(folder, args.records, args.records)
        for workers in args.workers:
            records = train(folder, data, workers, args.steps, args.log_every, args.batch_size)
            rows.append(summarise(records, args.warmup_records, workers))
            print(json.dumps(rows[-1]), flush=True)
    waits = {r["workers"]: r["data_wait_fraction"]["median"] for r in rows}
    print(json.dumps({"summary": "median data_wait_fraction after warm-up", "by_workers": waits, "target": TARGET,
                      "pass": waits[2] <= TARGET if 2 in waits else None,
                      "load_1min_at_end": round(os.getloadavg()[0], 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
