"""`mmlm similarity`: score images (or audio clips) against texts with a contrastive model."""

import argparse
import json
from pathlib import Path

from mmlm.cli.model_args import add_model_args, load_contrastive_inputs, probability_table
from mmlm.errors import InputError


def cmd_similarity(args: argparse.Namespace) -> None:
    """Print the probability of each text matching each image (or each audio clip, for an audio-text model)."""
    if not args.text:
        raise InputError("give at least one --text")
    model, inputs, given = load_contrastive_inputs(args)
    probs = model.similarity(inputs, args.text, args.batch_size)
    if args.json:
        out = [
            {given: path, "scores": dict(zip(args.text, map(float, row), strict=True))}
            for path, row in zip(inputs, probs.tolist(), strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        kind = "sigmoid per pair" if model.config.family == "siglip" else "softmax over texts"
        print(f"# {kind}")
        print(probability_table([Path(p).name for p in inputs], args.text, probs.tolist()))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `similarity` to the command line."""
    p = sub.add_parser("similarity", help="score images (or audio clips) against texts")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument(
        "--audio", action="append", default=[], help="an audio file, for audio-text models (repeatable)"
    )
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.set_defaults(func=cmd_similarity)
