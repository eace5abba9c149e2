"""`mmlm train clip|vlm`: train a model from a training config file plus key=value overrides.

SIGTERM or SIGINT stops a run after its current step with a checkpoint; the exit status is then 128 + the signal
(143, 130), as for a process the signal killed (mmlm.train.stop_signals).
"""

import argparse
import json
from collections.abc import Callable
from typing import Any


def cmd_train_clip(args: argparse.Namespace) -> None:
    """Train a CLIP/SigLIP model from a training config file plus key=value overrides."""
    from mmlm.train.config import load_train_config
    from mmlm.train.run import run_clip_training

    _train(run_clip_training, load_train_config(args.config, args.overrides), args.resume)


def cmd_train_vlm(args: argparse.Namespace) -> None:
    """Train a vision-language model through its stages from a training config file plus key=value overrides."""
    from mmlm.train.vlm_config import load_vlm_train_config
    from mmlm.train.vlm_loop import run_vlm_training

    _train(run_vlm_training, load_vlm_train_config(args.config, args.overrides), args.resume)


def _train(run: Callable[..., tuple[Any, list[dict]]], cfg: Any, resume: str | None) -> None:
    from mmlm.train.stop_signals import RunStopped

    try:
        _, records = run(cfg, resume=resume)
    except RunStopped as stop:  # the trainer logged the stop and wrote its checkpoint
        raise SystemExit(stop.exit_status) from None
    print(json.dumps({"out_dir": cfg.out_dir, **records[-1]}))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train clip` and `train vlm` to the command line."""
    p = sub.add_parser("train", help="train a model")
    train_sub = p.add_subparsers(dest="what", required=True)
    p = train_sub.add_parser("clip", help="contrastive image-text training (CLIP or SigLIP loss)")
    p.add_argument("--config", help="a training config (YAML or JSON); defaults otherwise")
    p.add_argument("--resume", help="'latest', or a checkpoint folder, to continue a run exactly")
    p.add_argument(
        "overrides", nargs="*", help="key=value settings, e.g. optim.lr=3e-4 data.source=pairs.jsonl"
    )
    p.set_defaults(func=cmd_train_clip)
    p = train_sub.add_parser(
        "vlm", help="LLaVA-style VLM training: connector alignment, then instruction tuning"
    )
    p.add_argument("--config", help="a training config (YAML or JSON); defaults otherwise")
    p.add_argument("--resume", help="'latest', or a checkpoint folder, to continue a run exactly")
    p.add_argument(
        "overrides", nargs="*", help="key=value settings, e.g. stages.instruct.optim.lr=1e-4 batch_size=16"
    )
    p.set_defaults(func=cmd_train_vlm)
