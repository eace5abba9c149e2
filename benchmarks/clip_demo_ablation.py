"""Ablations of the demo CLIP (`make demo`'s first half): what lifts its held-out zero-shot accuracy.

Each run trains `make demo`'s CLIP (450 steps; about 3-4 minutes on one CPU thread) with the shapes world's
caption settings given, and prints the figures it reaches on the *validation* sets that `make demo` scores
while training (zero-shot over the 64 colour×shape classes on images of the held-out pairs, the same on pairs
seen in training, retrieval R@1 both ways). The test sets are not touched: they are `make demo`'s, scored once.

    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0                           # make demo's settings
    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0 --colourless 0 --partial 0.3   # the old default
    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0 --colourless 0.5
    .venv/bin/python benchmarks/clip_demo_ablation.py --quick                            # 3 steps: that it runs

--colourless: share of scenes shown in greyscale with their colour words dropped (DataConfig.shapes_colourless);
--partial: share of one-object scenes captioned by colour or shape alone (DataConfig.shapes_partial_captions).
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmlm.recipes.demo import demo_config, shapes_evaluation
from mmlm.train.config import DataConfig
from mmlm.train.run import run_clip_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colourless", type=float, default=DataConfig.shapes_colourless)
    parser.add_argument("--partial", type=float, default=DataConfig.shapes_partial_captions)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 steps, 200 scenes, small validation sets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(demo_config(Path(tmp), steps=3 if args.quick else 450), seed=args.seed)
        data = replace(cfg.data, shapes_colourless=args.colourless, shapes_partial_captions=args.partial)
        if args.quick:
            data = replace(data, shapes_samples=200)
            cfg = replace(cfg, batch_size=32, eval_every=3, log_every=1)
        cfg = replace(cfg, data=data)
        size = cfg.model.vision.image_size
        validate, _ = shapes_evaluation(size, args.seed, validation=True, n_per_class=1 if args.quick else 6,
                                        n_retrieval=20 if args.quick else 300)  # fmt: skip
        start = time.perf_counter()
        _, records = run_clip_training(cfg, evaluate=validate)
    last = records[-1]
    print(json.dumps({
        "seed": args.seed, "colourless": args.colourless, "partial": args.partial, "threads": args.threads,
        "steps": cfg.steps, "val_zero_shot_top1": round(last["zero_shot_top1"], 3),
        "val_zero_shot_seen_top1": round(last["zero_shot_seen_top1"], 3),
        "val_image_to_text_R@1": round(last["image_to_text_R@1"], 3),
        "val_text_to_image_R@1": round(last["text_to_image_R@1"], 3),
        "seconds": round(time.perf_counter() - start, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
