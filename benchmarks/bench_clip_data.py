"""The CLIP trainer's loader on real JPEG photos: float32 pixels normalised in the workers against uint8 pixels.

Until training batches became uint8, `TrainTransform` normalised each crop in the loader workers through the
image processor's value table, and every batch went through worker IPC (and, on a GPU, pinned memory and the
host-to-device copy) as float32. Now the workers send uint8 and the trainer normalises on its device
(`PixelNormalize`). This times the loader alone, both ways, on the same crops:

- float32: today's `TrainTransform`, then the value table in the worker (the old path's arithmetic);
- uint8: today's `TrainTransform` as it is;
- uint8_normalised_here: uint8 batches normalised in this process, which is where a CPU "device" pays for it
  (on a GPU that is one small kernel);
- uint8_from_shards: uint8, read from webdataset shards that `mmlm shard` wrote once (not timed) with the
  images resized to a 256-px short side: what pre-resizing saves the workers in decoding.

Data: scikit-image's sample photographs (13 of them, grey ones as RGB), resized to a short side of 512 px and
saved as JPEG quality 90, listed round-robin in a JSONL manifest; 224-px random resized crops (the trainer's
default scale), batch 64, 2 workers, captions not tokenized (the same work on every side). Each round runs
every side once, in turn, reversing the order every round (benchmarks/timing.py); a side's rate counts the
batches after the first, so worker start-up and the first batch's fill are left out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_clip_data.py [--short-side 512]
    .venv/bin/python benchmarks/bench_clip_data.py --quick   # toy sizes, seconds: checks that it runs
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import alternating_rounds, ratio_of_medians, spread

from mmlm.data.augment import TrainTransform
from mmlm.data.datasets import PairCollate, PairDataset, PairLoader
from mmlm.data.readers import open_pairs
from mmlm.data.shards import ShardSettings, write_shards
from mmlm.processing.image import ImageProcessor, PixelNormalize

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "coins", "moon", "brick", "grass", "gravel")  # fmt: skip


def write_photos(folder: Path, short_side: int, samples: int) -> Path:
    """Write the sample photos as JPEGs with the given short side and a manifest of `samples` rows; return it."""
    from skimage import data

    names = []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        image = Image.fromarray(np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels)
        scale = short_side / min(image.size)
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
        )
        image.save(folder / f"{name}.jpg", quality=90)
        names.append(name)
    rows = [{"image": f"{names[i % len(names)]}.jpg", "text": f"a photo, number {i}"} for i in range(samples)]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


@dataclass
class WorkerNormalisedTransform:
    """The float32 path: the training crop normalised in the worker through the processor's value table."""

    transform: TrainTransform
    table: np.ndarray  # [3, 256]: uint8 level -> normalised float32, per channel

    def __call__(self, image, caption: str, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
        pixels, caption = self.transform(image, caption, rng)  # uint8 [3, H, W]
        return torch.from_numpy(self.table[np.arange(3)[:, None, None], pixels.numpy()]), caption


def loader_rate(source: str, transform, batch: int, workers: int, normalize=None) -> float:
    """Return batches per second after the first, over one pass of the source (seed 0: the same crops)."""
    dataset = PairDataset(open_pairs(source), transform, seed=0, batch_size=batch)
    count, start = 0, None
    for loaded in PairLoader(dataset, num_workers=workers, collate=PairCollate()):
        if normalize is not None:
            loaded.pixels = normalize(loaded.pixels)
        count += 1
        if start is None:
            start = time.perf_counter()
    return (count - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that the script runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--short-side", type=int, default=512, help="of the source JPEGs, in pixels")
    args = parser.parse_args()
    size, batch, batches, short_side = (64, 8, 4, 128) if args.quick else (224, 64, 12, args.short_side)
    rounds = 2 if args.quick else args.rounds
    processor = ImageProcessor.clip(size)
    uint8 = TrainTransform(size=size)
    with tempfile.TemporaryDirectory() as folder:
        manifest = str(write_photos(Path(folder), short_side, batch * batches))
        shard_size = 96 if args.quick else 256
        shards = write_shards(open_pairs(manifest), Path(folder) / "shards", ShardSettings(size=shard_size))
        sides = {
            "float32": (manifest, WorkerNormalisedTransform(uint8, processor.value_table()), None),
            "uint8": (manifest, uint8, None),
            "uint8_normalised_here": (manifest, uint8, PixelNormalize(processor)),
            "uint8_from_shards": (shards["pattern"], uint8, None),
        }
        measures = {
            name: (lambda s=source, t=transform, n=normalize: loader_rate(s, t, batch, args.workers, n))
            for name, (source, transform, normalize) in sides.items()
        }
        for measure in measures.values():  # untimed: the page cache, imports in the workers
            measure()
        rates = alternating_rounds(measures, rounds)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "workers": args.workers}
    for name, values in rates.items():
        bytes_per_batch = batch * 3 * size * size * (4 if name == "float32" else 1)
        print(json.dumps({"side": name, "batches_per_s": spread(values, 2),
                          "bytes_per_batch": bytes_per_batch}))  # fmt: skip
    summary = {
        "crop": size, "batch": batch, "batches_per_pass": batches, "rounds": rounds, "quick": args.quick,
        "source_short_side": short_side, "shard_short_side": shard_size,
        "uint8_over_float32": ratio_of_medians(rates["uint8"], rates["float32"]),
        "shards_over_uint8": ratio_of_medians(rates["uint8_from_shards"], rates["uint8"]), **machine,
    }  # fmt: skip
    print(json.dumps({"summary": summary}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
