"""Peak memory of `mmlm train vlm` as samples are drawn: does the data path hold on to what it has read?

A LLaVA-format JSONL of `max(--samples)` records over 224-px JPEGs (crops of scikit-image's photographs) trains a
tiny 224-px VLM (patch 32: 49 image tokens, width 32) for as many steps as draw each sample count, one run per
count in its own process, with `data.workers` workers. Each run reports the training process's peak RSS and the
largest worker's (getrusage: RUSAGE_SELF and RUSAGE_CHILDREN). The figure of merit is the ratio of the trainer's
peak RSS after the most samples to after the fewest: flat data loading keeps it near 1 (target <= 1.15).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_vlm_data_memory.py               # 1,000 and 10,000
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_vlm_data_memory.py --samples 500 3000
    PYTHONPATH=src python benchmarks/bench_vlm_data_memory.py --quick                          # seconds
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as photos

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field")
MODEL = {
    "vision": {"image_size": 224, "patch_size": 32, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
}
# runs the CLI, then reports its own and its largest child's (a data worker's) peak RSS in MB
MEASURE = (
    "import json, resource, sys; from mmlm.cli import main; status = main(sys.argv[1:]); "
    "print(json.dumps({'status': status, "
    "'trainer_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "'worker_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


def write_images(folder: Path, count: int) -> list[str]:
    """Write `count` distinct 224x224 JPEG crops of the photographs; return their names."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        image = np.asarray(getattr(photos, PHOTOS[i % len(PHOTOS)])())
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        y, x = rng.integers(0, image.shape[0] - 224), rng.integers(0, image.shape[1] - 224)
        names.append(f"img{i:05d}.jpg")
        Image.fromarray(image[y : y + 224, x : x + 224]).save(folder / names[-1], quality=90)
    return names


def write_conversations(folder: Path, records: int, images: int) -> Path:
    """Write a LLaVA JSONL of `records` one-image conversations over `images` JPEG files."""
    names = write_images(folder, images)
    path = folder / "conversations.jsonl"
    with path.open("w") as out:
        for i in range(records):
            turns = [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                     {"from": "gpt", "value": f"photo {i % images} of {PHOTOS[i % images % len(PHOTOS)]}"}]  # fmt: skip
            out.write(json.dumps({"id": str(i), "image": names[i % images], "conversations": turns}) + "\n")
    return path


def run(folder: Path, data: Path, samples: int, batch: int, workers: int) -> dict:
    """Train for the steps that draw `samples` samples; return its peak RSS figures and time."""
    config = folder / f"train-{samples}.json"
    stage = {"steps": -(-samples // batch), "train": ["connector"], "data": {"source": str(data)}}
    config.write_text(json.dumps({"model": MODEL, "stages": {"align": stage}, "batch_size": batch, "max_length": 96,
                                  "eval_samples": 0, "log_every": 50, "device": "cpu"}))  # fmt: skip
    command = [sys.executable, "-c", MEASURE, "train", "vlm", "--config", str(config),
               f"out_dir={folder / f'run-{samples}'}", f"data.workers={workers}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"samples": stage["steps"] * batch, "workers": workers, **figures,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=500, help="distinct JPEG files the records cycle over")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.images, args.batch_size = [32, 96], 16, 8
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_conversations(folder, max(args.samples), args.images)
        rows = [run(folder, data, n, args.batch_size, args.workers) for n in sorted(args.samples)]
    for row in rows:
        print(json.dumps(row))
    ratio = rows[-1]["trainer_mb"] / rows[0]["trainer_mb"]
    print(json.dumps({"summary": "peak trainer RSS, most samples over fewest", "ratio": round(ratio, 3),
                      "target": 1.15, "pass": ratio <= 1.15}))  # fmt: skip


if __name__ == "__main__":
    main()
