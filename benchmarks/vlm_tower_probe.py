"""How well the demo VLM's vision tower names each object on the held-out colour×shape pairs.

`make demo` tunes its CLIP's ViT to read each scene's labels from its patch tokens (mmlm.recipes.demo_vlm,
`pretrain_tower`: per grid cell the shape, colour and size) on the training side of the world only. This script
does the same tuning with a head it keeps, then scores that head per occupied cell on new scenes of the seen
pairs and of the held-out pairs (`cell_accuracy`). With `--frozen` only the head learns: a linear probe of the
CLIP's own patch tokens. A gap between the two rows is what the VLM cannot close: its answers about held-out
pairs rest on these tokens.

    .venv/bin/python benchmarks/vlm_tower_probe.py --clip runs/demo/model --seed 0
    .venv/bin/python benchmarks/vlm_tower_probe.py --clip runs/demo/model --seed 0 --frozen
    .venv/bin/python benchmarks/vlm_tower_probe.py --clip runs/demo/model --seed 0 --head cell
    .venv/bin/python benchmarks/vlm_tower_probe.py --clip runs/demo/model --seed 0 --colourless 0.3 --lr 5e-4
    .venv/bin/python benchmarks/vlm_tower_probe.py --fresh --steps 400 --colourless 0.3   # a fresh tower, no CLIP
    .venv/bin/python benchmarks/vlm_tower_probe.py --quick     # a fresh tiny tower, 2 steps: checks that it runs
"""

import argparse
import json
import time
from pathlib import Path

import torch

import mmlm
from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.colours import COLOURLESS_VIEWS
from mmlm.models.vision import VisionConfig, VisionTransformer
from mmlm.processing.image import ImageProcessor
from mmlm.recipes.demo import demo_config
from mmlm.recipes.demo_vlm import TOWER_STEPS, cell_accuracy, label_head, pretrain_tower


def main() -> None:
    """Tune (or probe) the tower on the seen pairs; print per-cell accuracy on seen and held-out pairs as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="runs/demo/model", help="a make demo CLIP")
    parser.add_argument("--seed", type=int, default=0, help="the world's split (match the CLIP's demo seed)")
    parser.add_argument("--steps", type=int, default=TOWER_STEPS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--colourless", type=float, default=0.0, help="share of views without named colours in the tuning"
    )
    parser.add_argument("--colourless-view", choices=COLOURLESS_VIEWS, default="unnamed",
                        help="those views in random unnamed colours or in greyscale")  # fmt: skip
    parser.add_argument("--frozen", action="store_true", help="train only the head: a linear probe")
    parser.add_argument("--head", choices=["global", "cell"], default="global",
                        help="global: one linear map from all tokens (the demo's); cell: each cell from its own")  # fmt: skip
    parser.add_argument("--samples", type=int, default=600, help="scenes scored on each side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true",
                        help="tune a freshly initialised tower of the demo CLIP's shape instead of --clip's")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a fresh tiny tower, 2 steps, 16 scenes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.quick:
        cfg = VisionConfig(
            image_size=48, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64, embed_dim=None
        )
        tower, processor = VisionTransformer(cfg), ImageProcessor(size=48, crop_size=(48, 48))
        args.steps, args.samples = 2, 16
    elif args.fresh:
        cfg = demo_config(Path("unused")).model.vision
        tower = VisionTransformer(cfg)
        processor = ImageProcessor(size=cfg.image_size, crop_size=(cfg.image_size, cfg.image_size))
    else:
        clip = mmlm.load(args.clip)
        tower, processor = clip.model.visual, clip.image_processor
    seen, heldout = shapes.split_world(args.seed)
    head = label_head(tower, args.head)
    start = time.perf_counter()
    losses = pretrain_tower(tower, processor, seen, args.steps, args.batch_size, seed=args.seed, lr=args.lr,
                            colourless=args.colourless, head=head, train_tower=not args.frozen,
                            colourless_view=args.colourless_view)  # fmt: skip
    figures = {
        "seen_pairs": cell_accuracy(tower, head, processor, seen, args.samples, args.seed),
        "heldout_pairs": cell_accuracy(tower, head, processor, heldout, args.samples, args.seed),
    }
    print(json.dumps({"clip": None if args.quick or args.fresh else args.clip, "seed": args.seed, "steps": args.steps,
                      "batch_size": args.batch_size, "head": args.head,
                      "lr": args.lr, "colourless": args.colourless,
                      "colourless_view": args.colourless_view, "frozen": args.frozen,
                      "first_loss": round(losses[0], 3), "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                      "seconds": round(time.perf_counter() - start, 1),
                      **{side: {k: round(v, 3) for k, v in f.items()} for side, f in figures.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
