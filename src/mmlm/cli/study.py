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


def _types(text: str, flag: str) -> tuple[str, ...]:
    from mmlm.recipes.demo_ladder import LADDER_TYPES

    types = tuple(t.strip() for t in text.split(",") if t.strip())
    if set(types) - set(LADDER_TYPES):
        raise InputError(f"{flag}: expected some of {list(LADDER_TYPES)}, got {text!r}")
    return types


def cmd_ladder(args: argparse.Namespace) -> None:
    """Run `mmlm study ladder`: the demo's LM on spelled-out scenes, oracle slots and a real tower."""
    import json

    import torch

    from mmlm.recipes.demo_ladder import RUNGS, LadderConfig, ladder_table, run_ladder

    rungs = tuple(r.strip() for r in args.rungs.split(",") if r.strip())
    if not rungs or set(rungs) - set(RUNGS):
        raise InputError(f"--rungs: expected some of {list(RUNGS)}, got {args.rungs!r}")
    if args.steps < 1 or args.val_samples < 1 or args.layers < 1:
        raise InputError("--steps, --val-samples and --layers: expected positive integers")
    if args.lr <= 0:
        raise InputError(f"--lr: expected a positive learning rate, got {args.lr}")
    types, first_types = _types(args.types, "--types"), _types(args.first_types, "--first-types")
    if not types or args.first_steps < 0 or (args.first_steps > 0) != bool(first_types):
        raise InputError(
            "--types: expected one type or more; --first-types and --first-steps: both or neither"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LadderConfig(steps=args.steps, lr=args.lr, layers=args.layers, width=args.width,
                       val_samples=args.val_samples, seed=args.seed, types=types, first_types=first_types,
                       first_steps=args.first_steps)  # fmt: skip
    rows = run_ladder(cfg, rungs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": vars(cfg), "rows": rows}, indent=2) + "\n")
    (out / "table.md").write_text(ladder_table(rows) + "\n")
    print(ladder_table(rows))
    print(f"wrote {out / 'results.json'} and table.md")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `study fusion` and `study ladder` to the command line."""
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
    g = kinds.add_parser(
        "ladder", help="where the demo VLM stops learning: scene as text, oracle slots, tower"
    )
    g.add_argument("--out", default="runs/study/ladder")
    g.add_argument("--rungs", default="text,oracle,tower", help="comma-separated: text, oracle, tower")
    g.add_argument("--steps", type=int, default=800, help="training steps per rung (batch 64)")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--layers", type=int, default=2, help="LM layers")
    g.add_argument("--width", type=int, default=128, help="LM (and tower) width")
    g.add_argument("--val-samples", type=int, default=300, help="validation questions per rung")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--types", default="count,color,relation,presence,text,chart", help="question types")
    g.add_argument("--first-types", default="", help="a curriculum: train on these types first ...")
    g.add_argument("--first-steps", type=int, default=0, help="... for this many steps, then on --types")
    g.set_defaults(func=cmd_ladder)
