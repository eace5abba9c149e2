"""`mmlm study fusion`: check the arguments, then run the fusion study of `mmlm.recipes.study` (or time its saved
models again) and print its table."""

import argparse
from pathlib import Path

from mmlm.errors import InputError
from mmlm.recipes.study import STYLES


def cmd_study(args: argparse.Namespace) -> None:
    """Run `mmlm study fusion`."""
    import torch

    from mmlm.recipes.study import remeasure, study_fusion, table

    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = sorted(set(styles) - set(STYLES))
    if unknown or not styles:
        raise InputError(f"--styles: unknown {unknown}; expected some of {list(STYLES)}")
    if args.steps < 3:
        raise InputError(f"--steps: expected at least 3, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_only:
        rows = remeasure(Path(args.out))
    else:
        rows = study_fusion(Path(args.out), Path(args.vision), args.steps, styles, args.eval_samples)
    print(table(rows))
    print(f"wrote {Path(args.out) / 'results.json'}, table.md and fusion.png")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `study fusion` to the command line."""
    p = sub.add_parser("study", help="studies that train and compare several models")
    kinds = p.add_subparsers(dest="study", required=True)
    f = kinds.add_parser("fusion", help="train every fusion style on the same shapes budget and compare them")
    f.add_argument(
        "--vision", default="runs/demo/vlm_tower", help="the vision tower folder (make demo writes it)"
    )
    f.add_argument("--out", default="runs/study/fusion")
    f.add_argument("--steps", type=int, default=600, help="instruction-tuning steps per style")
    f.add_argument("--styles", default=",".join(STYLES), help="comma-separated fusion styles")
    f.add_argument("--eval-samples", type=int, default=420, help="test questions per style")
    f.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    f.add_argument(
        "--measure-only", action="store_true", help="only time the saved models again (quiet machine)"
    )
    f.set_defaults(func=cmd_study)
