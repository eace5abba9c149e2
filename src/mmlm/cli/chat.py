"""`mmlm chat`: ask a multimodal LM about images, videos or audio clips, once or as a conversation, streamed."""

import argparse
import sys
from typing import Any

from mmlm.cli.model_args import add_model_args, load_model
from mmlm.errors import InputError


def user_turn(text: str, images: int, videos: int = 0, audio: int = 0) -> dict[str, Any]:
    """Return a user message with `images` image parts, `videos` video parts and `audio` audio parts, then text."""
    parts = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "audio"}] * audio
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def cmd_chat(args: argparse.Namespace) -> None:
    """Answer one question about the images, or start an interactive conversation without a question."""
    from mmlm.inference.vlm import GenerativeModel

    if args.max_new_tokens <= 0:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model = load_model(args)
    if not isinstance(model, GenerativeModel):
        raise InputError(f"{args.model} is not a vision-language model (got a {type(model).__name__})")
    images, videos, audio = list(args.image or []), list(args.video or []), list(args.audio or [])
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                   videos=videos, num_frames=args.frames, audio=audio or None)  # fmt: skip
    media = (len(images), len(videos), len(audio))
    if args.question:
        messages.append(user_turn(args.question, *media))
        for piece in model.stream(messages, images, **options):
            print(piece, end="", flush=True)
        print()
        return
    print("type a message; an empty line or Ctrl-D ends the conversation", file=sys.stderr)
    first = True
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append(user_turn(text, *(media if first else (0, 0, 0))))
        first = False
        print("model> ", end="", flush=True)
        answer = ""
        for piece in model.stream(messages, images, **options):
            answer += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": answer})


def register(sub: argparse._SubParsersAction) -> None:
    """Add `chat` to the command line."""
    p = sub.add_parser(
        "chat", help="ask a vision-language model about images (interactive without a question)"
    )
    add_model_args(p)
    p.add_argument("--image", action="append", help="an image file (repeatable; all go in the first turn)")
    p.add_argument(
        "--video", action="append", help="a video file (repeatable; its frames go in the first turn)"
    )
    p.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from each video")
    p.add_argument(
        "--audio", action="append", help="an audio file (repeatable; a model with an audio tower; first turn)"
    )
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("question", nargs="?", help="the question; omit it for an interactive conversation")
    p.set_defaults(func=cmd_chat)
