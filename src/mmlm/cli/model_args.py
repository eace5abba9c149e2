"""The arguments every model-loading command shares (--model, --device, --dtype, --batch-size, --json),
the loading they drive, and the probability table the contrastive commands print."""

import argparse
from collections.abc import Sequence
from typing import Any

from mmlm.errors import InputError

MODEL_HELP = "a transformers-format or mmlm checkpoint folder, or a Hugging Face hub id (org/name)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add --model, --revision, --device, --dtype, --batch-size and --json to a subcommand's parser."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_revision_arg(p)
    add_device_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_revision_arg(
    p: argparse.ArgumentParser, flag: str = "--revision", model_flag: str = "--model"
) -> None:
    """Add --revision, the branch, tag or commit of a hub id given as `model_flag`, to a subcommand's parser."""
    p.add_argument(flag, help=f"the branch, tag or commit of a hub id {model_flag} (default: main)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """Add --device and --dtype, where a command's model runs, to a subcommand's parser."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def load_model(args: argparse.Namespace) -> Any:
    """Return the model `mmlm.load` gives for --model, --device and --dtype, after checking --batch-size."""
    import mmlm

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    return mmlm.load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)


def load_contrastive_inputs(args: argparse.Namespace) -> tuple[Any, list[str], str]:
    """Return (model, input paths, "image" | "audio") after checking the inputs suit the contrastive model."""
    if bool(args.image) == bool(args.audio):
        raise InputError(
            "give --image files (an image-text model) or --audio files (an audio-text model), not both"
        )
    given = "audio" if args.audio else "image"
    model = load_model(args)
    modality = getattr(model, "modality", None)
    if modality != given:
        what = f"an {modality}-text model" if modality else "not a contrastive model"
        raise InputError(f"--{given} given, but {args.model} is {what}; it scores {modality or 'no'} inputs")
    return model, args.audio or args.image, given


def probability_table(
    row_names: Sequence[str], col_names: Sequence[str], values: Sequence[Sequence[float]]
) -> str:
    """Return a plain-text table of `values`, one row per input and one column per text, four decimals."""
    width = max(len(n) for n in row_names)
    cols = [max(len(c), 6) for c in col_names]
    head = " " * width + "  " + "  ".join(c.rjust(w) for c, w in zip(col_names, cols, strict=True))
    rows = [
        name.ljust(width) + "  " + "  ".join(f"{v:.4f}".rjust(w) for v, w in zip(row, cols, strict=True))
        for name, row in zip(row_names, values, strict=True)
    ]
    return "\n".join([head, *rows])
