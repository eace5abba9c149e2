"""Videos in prompts: each `<video>` (or `{"type": "video"}` part) becomes one image slot per sampled frame.

A video reaches the model as its frames, sampled uniformly (or at a rate) over the whole clip and encoded by
the same vision tower as images, in order; the fusion style then decides what each frame costs the LM (a
projector N tokens, a resampler L). With `group` > 1 (the model's `video_pool`), each slot holds a tuple of that
many consecutive frames, which the model merges over time (mean, or a resampler with time embeddings), so a
video of F frames takes ceil(F / group) slots.
"""

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.chat import IMAGE_TOKEN
from mmlm.processing.video import read_video

VIDEO_TOKEN = "<video>"
PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
Sampler = Callable[[Any], list[Image.Image]]


def frame_sampler(num_frames: int = 8, fps: float | None = None) -> Sampler:
    """Return a function from a video (path or bytes) to its frames: `num_frames` uniform, or at `fps` (capped)."""

    if fps is not None:
        return lambda video: read_video(video, fps=fps, max_frames=num_frames).frames
    return lambda video: read_video(video, num_frames=num_frames).frames


def _next(items: Iterator[Any], what: str) -> Any:
    try:
        return next(items)
    except StopIteration:
        raise InputError(f"{what}: more placeholders than {what} given") from None


def frame_slots(frames: Sequence[Image.Image], group: int) -> list[Any]:
    """Return what fills a video's image slots: its frames (group 1) or tuples of `group` consecutive frames."""
    if group <= 1:
        return list(frames)
    return [tuple(frames[i : i + group]) for i in range(0, len(frames), group)]


def slot_parts(
    slots: list[Any], with_sources: bool = True, last_joined: bool = False
) -> list[dict[str, Any]]:
    """Return one video's image parts, one per slot (carrying it if `with_sources`). All but the last are marked
    `joined`, which the built-in chat templates write with no newline after, so the slots sit together as
    `<video>` in a string prompt expands; `last_joined` marks the last too (the text around them is written as is)."""
    parts = [{"type": "image", "image": slot} if with_sources else {"type": "image"} for slot in slots]
    for part in parts if last_joined else parts[:-1]:
        part["joined"] = True
    return parts


def _expand_text(
    text: str, images: Iterator[Any] | None, videos: Iterator[Any], sample: Sampler, out: list, group: int
) -> str:
    pieces = []
    for piece in PLACEHOLDER.split(text):
        if piece == VIDEO_TOKEN:
            slots = frame_slots(sample(_next(videos, "videos")), group)
            out.extend(slots)
            pieces.append(IMAGE_TOKEN * len(slots))
        else:
            if piece == IMAGE_TOKEN and images is not None:
                out.append(_next(images, "images"))
            pieces.append(piece)
    return "".join(pieces)


def _text_to_parts(text: str, videos: Iterator[Any], sample: Sampler, group: int) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for piece in re.split(f"({re.escape(VIDEO_TOKEN)})", text):
        if piece == VIDEO_TOKEN:
            parts += slot_parts(frame_slots(sample(_next(videos, "videos")), group), last_joined=True)
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def expand_videos(
    prompt: str | Sequence[dict[str, Any]],
    images: Sequence[Any] | None,
    videos: Sequence[Any],
    sample: Sampler,
    group: int = 1,
) -> tuple[str | list[dict[str, Any]], list[Any] | None]:
    """Return (prompt, images) with every video replaced by its frames (grouped `group` per slot), as image slots
    in the same place.

    In a str prompt `<video>` marks each video; in chat messages a `{"type": "video"}` part does (its own
    "video" source, else the next of `videos`). Images keep their order among the frames. With messages whose
    image parts carry their sources and no `images`, the frames go into image parts too and images stay None.
    """
    pending, out = iter(videos), []
    given = None if images is None else iter(images)
    if isinstance(prompt, str):
        text = _expand_text(prompt, given, pending, sample, out, group)
        frames_and_images = out
    else:
        messages = []
        for message in prompt:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and given is not None:
                messages.append(
                    {**message, "content": _expand_text(content, given, pending, sample, out, group)}
                )
                continue
            if isinstance(content, str):  # no image list: the frames become image parts that carry them
                messages.append({**message, "content": _text_to_parts(content, pending, sample, group)})
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
                    slots = frame_slots(frames, group)
                    out.extend(slots)
                    parts += slot_parts(slots, with_sources=given is None)
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
