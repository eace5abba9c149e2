"""`mmlm demo`: the main demo job (images: CLIP then VLM), the video VLM demo, or the audio-text CLIP demo."""

import argparse
from pathlib import Path

from mmlm.errors import InputError


def cmd_demo(args: argparse.Namespace) -> None:
    """Run the main demo job (images: CLIP then VLM), the video VLM demo, or the audio-text CLIP demo."""
    if args.modality == "audio":
        from mmlm.recipes.demo_audio import run_audio_demo

        run_audio_demo(Path(args.out) / "audio")
        return
    if args.seed < 0:
        raise InputError(f"--seed: expected a non-negative integer, got {args.seed}")
    if args.modality == "video":
        from mmlm.recipes.demo_video import run_video_demo

        given = {k: v for k, v in (("frames", args.frames), ("video_pool", args.video_pool),
                                   ("video_merge", args.video_merge)) if v is not None}  # fmt: skip
        if any(given.get(k, 1) < 1 for k in ("frames", "video_pool")):
            raise InputError(
                f"--frames and --video-pool: expected at least 1, got {args.frames} and {args.video_pool}"
            )
        run_video_demo(Path(args.out), seed=args.seed, **given)
        return
    if args.rescore:
        from mmlm.recipes.demo_vlm import rescore_vlm_demo

        rescore_vlm_demo(Path(args.out))
        return
    from mmlm.recipes.demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `demo` to the command line."""
    p = sub.add_parser("demo", help="the main demo job")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="image: the seed of data, splits and weights; video: of weights and batches",
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="image: score the demo VLM in --out again with this version's evaluation (no training)",
    )
    p.add_argument("--frames", type=int, help="video: frames sampled from each clip (default 4)")
    p.add_argument("--video-pool", type=int, help="video: frames merged into one image slot (default 1)")
    p.add_argument("--video-merge", choices=["mean", "resampler"],
                   help="video: average a slot's frames (the default), or read them with a perceiver's time "
                        "embeddings")  # fmt: skip
    p.add_argument("--modality", choices=["image", "video", "audio"], default="image",
                   help="image: CLIP then VLM (make demo); video: a VLM on shapes-world clips; "
                        "audio: an audio-text CLIP on spoken words (espeak-ng)")  # fmt: skip
    p.set_defaults(func=cmd_demo)
