"""Videos in prompts: each `<video>` (or `{"type": "video"}` part) becomes one image slot per sampled frame.

A video reaches the model as its frames, sampled uniformly (or at a rate) over the whole clip and encoded by
the same vision tower as images, in order; the fusion style then decides what each frame costs the LM (a
projector N tokens, a resampler L). Frames are not pooled over time here.
"""

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.chat import IMAGE_TOKEN

VIDEO_TOKEN = "<video>"
PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
Sampler = Callable[[Any], list[Image.Image]]


def frame_sampler(num_frames: int = 8, fps: float | None = None) -> Sampler:
    """Return a function from a video (path or bytes) to its frames: `num_frames` uniform, or at `fps` (capped)."""
    from mmlm.processing.video import read_video

    if fps is not None:
        return lambda video: read_video(video, fps=fps, max_frames=num_frames).frames
    return lambda video: read_video(video, num_frames=num_frames).frames


def _next(items: Iterator[Any], what: str) -> Any:
    try:
        return next(items)
    except StopIteration:
        raise InputError(f"{what}: more placeholders than {what} given") from None


def _expand_text(
    text: str, images: Iterator[Any] | None, videos: Iterator[Any], sample: Sampler, out: list
) -> str:
    pieces = []
    for piece in PLACEHOLDER.split(text):
        if piece == VIDEO_TOKEN:
            frames = sample(_next(videos, "videos"))
            out.extend(frames)
            pieces.append(IMAGE_TOKEN * len(frames))
        else:
            if piece == IMAGE_TOKEN and images is not None:
                out.append(_next(images, "images"))
            pieces.append(piece)
    return "".join(pieces)


def _text_to_parts(text: str, videos: Iterator[Any], sample: Sampler) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for piece in re.split(f"({re.escape(VIDEO_TOKEN)})", text):
        if piece == VIDEO_TOKEN:
            parts += [{"type": "image", "image": frame} for frame in sample(_next(videos, "videos"))]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def expand_videos(
    prompt: str | Sequence[dict[str, Any]],
    images: Sequence[Any] | None,
    videos: Sequence[Any],
    sample: Sampler,
) -> tuple[str | list[dict[str, Any]], list[Any] | None]:
    """Return (prompt, images) with every video replaced by its frames, as image slots in the same place.

    In a str prompt `<video>` marks each video; in chat messages a `{"type": "video"}` part does (its own
    "video" source, else the next of `videos`). Images keep their order among the frames. With messages whose
    image parts carry their sources and no `images`, the frames go into image parts too and images stay None.
    """
    pending, out = iter(videos), []
    given = None if images is None else iter(images)
    if isinstance(prompt, str):
        text = _expand_text(prompt, given, pending, sample, out)
        frames_and_images = out
    else:
        messages = []
        for message in prompt:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and given is not None:
                messages.append({**message, "content": _expand_text(content, given, pending, sample, out)})
                continue
            if isinstance(content, str):  # no image list: the frames become image parts that carry them
                messages.append({**message, "content": _text_to_parts(content, pending, sample)})
                continue
            if not isinstance(content, list | tuple):
                messages.append(message)
                continue
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "video":
                    frames = sample(
                        part["video"] if part.get("video") is not None else _next(pending, "videos")
                    )
                    out.extend(frames)
                    parts += [
                        {"type": "image", "image": f} if given is None else {"type": "image"} for f in frames
                    ]
                elif kind == "image" and given is not None:
                    out.append(_next(given, "images"))
                    parts.append(part)
                else:
                    parts.append(part)
            messages.append({**message, "content": parts})
        text, frames_and_images = messages, out
    if next(pending, None) is not None:
        raise InputError(
            f"videos: got {len(videos)} video(s) but fewer {VIDEO_TOKEN} placeholders / video parts"
        )
    if given is not None and next(given, None) is not None:
        raise InputError(f"images: got {len(images)} image(s) but fewer {IMAGE_TOKEN} placeholders")
    if given is None and not isinstance(prompt, str):
        return text, None
    return text, frames_and_images
