"""The `mmlm` command line: thin subcommands that call the library. Bad input exits 2 with one line."""

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mmlm.errors import InputError

# Command groups that live beside the code they drive; each module has `register(subparsers)`.
COMMAND_MODULES = (
    "mmlm.cli.eval",
    "mmlm.cli.index",
    "mmlm.cli.chat",
    "mmlm.cli.budget",
    "mmlm.recipes.study",
    "mmlm.cli.score",
    "mmlm.cli.serve",
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a transformers-format or mmlm checkpoint folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _table(row_names: Sequence[str], col_names: Sequence[str], values) -> str:
    width = max(len(n) for n in row_names)
    cols = [max(len(c), 6) for c in col_names]
    head = " " * width + "  " + "  ".join(c.rjust(w) for c, w in zip(col_names, cols, strict=True))
    rows = [
        name.ljust(width) + "  " + "  ".join(f"{v:.4f}".rjust(w) for v, w in zip(row, cols, strict=True))
        for name, row in zip(row_names, values, strict=True)
    ]
    return "\n".join([head, *rows])


def _load(args: argparse.Namespace):
    import mmlm

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    return mmlm.load(args.model, device=args.device, dtype=args.dtype)


def _inputs(args: argparse.Namespace):
    """Return (model, input paths, "image" | "audio") after checking the inputs suit the contrastive model."""
    if bool(args.image) == bool(args.audio):
        raise InputError(
            "give --image files (an image-text model) or --audio files (an audio-text model), not both"
        )
    given = "audio" if args.audio else "image"
    model = _load(args)
    modality = getattr(model, "modality", None)
    if modality != given:
        what = f"an {modality}-text model" if modality else "not a contrastive model"
        raise InputError(f"--{given} given, but {args.model} is {what}; it scores {modality or 'no'} inputs")
    return model, args.audio or args.image, given


def cmd_similarity(args: argparse.Namespace) -> None:
    """Print the probability of each text matching each image (or each audio clip, for an audio-text model)."""
    if not args.text:
        raise InputError("give at least one --text")
    model, inputs, given = _inputs(args)
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
        print(_table([Path(p).name for p in inputs], args.text, probs.tolist()))


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
    model, inputs, given = _inputs(args)
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
        print(_table([Path(p).name for p in inputs], labels, probs))


def cmd_train_clip(args: argparse.Namespace) -> None:
    """Train a CLIP/SigLIP model from a training config file plus key=value overrides."""
    from mmlm.train.config import load_train_config
    from mmlm.train.run import run_clip_training

    cfg = load_train_config(args.config, args.overrides)
    loaded, records = run_clip_training(cfg, resume=args.resume)
    print(json.dumps({"out_dir": cfg.out_dir, **records[-1]}))


def cmd_train_vlm(args: argparse.Namespace) -> None:
    """Train a vision-language model through its stages from a training config file plus key=value overrides."""
    from mmlm.train.vlm_config import load_vlm_train_config
    from mmlm.train.vlm_loop import run_vlm_training

    cfg = load_vlm_train_config(args.config, args.overrides)
    loaded, records = run_vlm_training(cfg, resume=args.resume)
    print(json.dumps({"out_dir": cfg.out_dir, **records[-1]}))


def cmd_demo(args: argparse.Namespace) -> None:
    """Run the main demo job (images: CLIP then VLM), the video VLM demo, or the audio-text CLIP demo."""
    if args.modality == "audio":
        from mmlm.recipes.demo_audio import run_audio_demo

        run_audio_demo(Path(args.out) / "audio")
        return
    if args.modality == "video":
        from mmlm.recipes.demo_video import run_video_demo

        if args.frames < 1 or args.video_pool < 1:
            raise InputError(
                f"--frames and --video-pool: expected at least 1, got {args.frames} and {args.video_pool}"
            )
        run_video_demo(
            Path(args.out), frames=args.frames, video_pool=args.video_pool, video_merge=args.video_merge
        )
        return
    from mmlm.recipes.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mmlm", description="multimodal language models: load, score, train, evaluate"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("similarity", help="score images (or audio clips) against texts")
    _model_args(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument(
        "--audio", action="append", default=[], help="an audio file, for audio-text models (repeatable)"
    )
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("classify", help="zero-shot classification of images (or audio clips)")
    _model_args(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument(
        "--audio", action="append", default=[], help="an audio file, for audio-text models (repeatable)"
    )
    p.add_argument("--labels", required=True, help="comma-separated class names")
    p.add_argument(
        "--templates", help="a file with one prompt template per line, {} or {c} marking the class"
    )
    p.set_defaults(func=cmd_classify)

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

    p = sub.add_parser("demo", help="the main demo job")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--frames", type=int, default=8, help="video: frames sampled from each clip")
    p.add_argument("--video-pool", type=int, default=2, help="video: frames merged into one image slot")
    p.add_argument("--video-merge", choices=["mean", "resampler"], default="resampler",
                   help="video: average a slot's frames, or read them with a perceiver's time embeddings")  # fmt: skip
    p.add_argument("--modality", choices=["image", "video", "audio"], default="image",
                   help="image: CLIP then VLM (make demo); video: a VLM on shapes-world clips; "
                        "audio: an audio-text CLIP on spoken words (espeak-ng)")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"mmlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
