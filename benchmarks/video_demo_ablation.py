"""Variants of the video demo (`mmlm demo --modality video`), scored on the validation clips only.

Each variant goes on from an image demo's VLM (`--base`, a `make demo` output folder with `vlm` and
`vlm_tower`), trains on shapes-world clips as the recipe does (mmlm.recipes.demo_video) with one change, and
prints validation accuracy per clip kind (200 clips, seeds from 2,000,000). The test clips are never touched: they
are the recipe's to score, once.

    .venv/bin/python benchmarks/video_demo_ablation.py --base runs/demo --out runs/video_abl/base
    .venv/bin/python benchmarks/video_demo_ablation.py --base runs/demo --out runs/video_abl/q --no-describe
    .venv/bin/python benchmarks/video_demo_ablation.py --base runs/demo --out runs/video_abl/6k --clips 6000
    .venv/bin/python benchmarks/video_demo_ablation.py --quick     # 3 steps, 8 clips, 4 validation clips, a
                                                                   # fresh tower and LM: checks that it runs
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mmlm.recipes import demo_video as dv
from mmlm.train.vlm_loop import run_vlm_training


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", help="a make demo output folder (its vlm and vlm_tower); none: a fresh VLM")
    parser.add_argument("--out", default="runs/video_ablation")
    parser.add_argument("--steps", type=int, default=dv.STEPS)
    parser.add_argument("--clips", type=int, default=dv.TRAIN_CLIPS)
    parser.add_argument("--no-describe", action="store_true", help="train on the questions alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="toy sizes, seconds: checks that it runs")
    args = parser.parse_args()
    val_clips = dv.TEST_CLIPS
    if args.quick:
        args.steps, args.clips, val_clips = 3, 8, 4
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vlm", "vlm_tower") if args.base else ():
        if not (out / name).exists():
            os.symlink((Path(args.base) / name).resolve(), out / name)
    tower, vlm = (out / "vlm_tower", out / "vlm") if args.base else (None, None)
    start = time.perf_counter()
    train_json = dv.write_train_set(out / "video_data" / "train", args.clips, dv.FRAMES, not args.no_describe)
    rows = dv.write_test_set(out / "video_data" / "val", val_clips, first_seed=dv.VAL_SEED)
    cfg = dv.demo_video_config(out, train_json, tower, args.steps, base=vlm)
    cfg.seed = args.seed
    loaded, _ = run_vlm_training(cfg)
    val = dv.score_clips(loaded, rows, out / "video_eval" / "val")["normal"]
    print(json.dumps({"variant": vars(args), "val": {k: round(v, 3) for k, v in val.items()},
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
