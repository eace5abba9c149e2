"""`mmlm classify`: zero-shot classification of images (or audio clips) with a contrastive model."""

import argparse
import json
from pathlib import Path

from mmlm.cli.model_args import add_model_args, load_contrastive_inputs, probability_table
from mmlm.errors import InputError


def _templates(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise InputError(f"templates file {path} not found")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise InputError(f"templates file {path} has no templates")
    return lines


def cmd_classify(args: argparse.Namespace) -> None:
    """Print zero-shot class probabilities for each image (or each audio clip, for an audio-text model)."""
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise InputError("--labels needs at least one class name, e.g. --labels cat,dog")
    templates = _templates(args.templates)
    model, inputs, given = load_contrastive_inputs(args)
    probs = model.classify(inputs, labels, templates, args.batch_size).tolist()
    if args.json:
        out = [
            {
                given: img,
                "label": labels[max(range(len(row)), key=row.__getitem__)],
                "probabilities": dict(zip(labels, row, strict=True)),
            }
            for img, row in zip(inputs, probs, strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        print(probability_table([Path(p).name for p in inputs], labels, probs))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `classify` to the command line."""
    p = sub.add_parser("classify", help="zero-shot classification of images (or audio clips)")
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument(
        "--audio", action="append", default=[], help="an audio file, for audio-text models (repeatable)"
    )
    p.add_argument("--labels", required=True, help="comma-separated class names")
    p.add_argument(
        "--templates", help="a file with one prompt template per line, {} or {c} marking the class"
    )
    p.set_defaults(func=cmd_classify)
