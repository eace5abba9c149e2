"""Shapes-world videos: short clips of shapes that move, appear, disappear or change colour, with a caption
and one question whose answer needs more than one frame.

Each clip is rendered frame by frame from `Scene`s (`mmlm.data.synthetic.shapes.render`), so the ground truth is known
exactly; `write_video` stores the frames as a real MP4 (H.264) or WebM (VP9) file through PyAV. Every clip is
deterministic given (kind, seed).
"""

import os
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from PIL import Image

from mmlm.data.synthetic.scene import COLORS, SHAPES, SIZES, Scene, ShapeObject
from mmlm.data.synthetic.shapes import render
from mmlm.errors import InputError

VIDEO_KINDS: tuple[str, ...] = ("move", "appear", "disappear", "color")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TRAVEL = (
    0.22,
    0.78,
)  # start and end of a move along its axis, as fractions of the side; the large radius is 0.14
# libx264 and libvpx-vp9 in yuv420p; the constant-quality settings keep the flat shapes' colours close
_CODECS = {".mp4": ("libx264", {"crf": "18", "preset": "veryfast"}),
           ".webm": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8"})}  # fmt: skip


class VideoSample(NamedTuple):
    """One generated clip: its frames, a caption true of the whole clip, a question and its short answer."""

    frames: list[Image.Image]
    caption: str
    question: str
    answer: str


def _pick(rng: np.random.Generator, options: list | tuple) -> object:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _two_objects(rng: np.random.Generator) -> tuple[ShapeObject, ShapeObject]:
    # two distinct colours and shapes, in the left and right halves, so each is named by colour + shape
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), 2, replace=False)]
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False)]
    ys = rng.uniform(0.25, 0.75, size=2).round(4)
    first = ShapeObject(shapes[0], colors[0], _pick(rng, SIZES), 0.27, float(ys[0]))
    second = ShapeObject(shapes[1], colors[1], _pick(rng, SIZES), 0.73, float(ys[1]))
    return (first, second) if rng.random() < 0.5 else (second, first)


def _event_frame(rng: np.random.Generator, frames: int) -> int:
    # in the middle half of the clip, so both states are seen for at least a quarter of it
    return int(rng.integers(frames // 4, max(frames // 4 + 1, 3 * frames // 4)))


def make_video(kind: str, seed: int, frames: int = 16, size: int = 64, fps: float = 8) -> VideoSample:
    """Return a clip of `kind` ("move", "appear", "disappear", "color") as (frames, caption, question, answer)."""
    if kind not in VIDEO_KINDS:
        raise InputError(f"kind: got {kind!r}; expected one of {VIDEO_KINDS}")
    if frames < 4:
        raise InputError(f"frames: got {frames}; expected at least 4 so the clip has a before and an after")
    rng = np.random.default_rng([seed, VIDEO_KINDS.index(kind)])
    scenes: list[Scene]
    if kind == "move":
        direction = str(_pick(rng, list(DIRECTIONS)))
        color, shape = str(_pick(rng, list(COLORS))), str(_pick(rng, SHAPES))
        dx, dy = DIRECTIONS[direction]
        across = float(rng.uniform(0.3, 0.7))  # the fixed coordinate
        scenes = []
        for i in range(frames):
            along = TRAVEL[0] + (TRAVEL[1] - TRAVEL[0]) * i / (frames - 1)  # linear, start to end
            along = along if dx + dy > 0 else 1 - along
            x, y = (along, across) if dx else (across, along)
            scenes.append(Scene((ShapeObject(shape, color, "large", round(x, 4), round(y, 4)),)))
        where = direction if direction in ("up", "down") else f"to the {direction}"
        caption = f"{_article(color)} {color} {shape} moves {where}"
        question, answer = f"Which direction does the {color} {shape} move?", direction
    elif kind == "appear":
        first, second = _two_objects(rng)
        at_first = int(rng.integers(0, frames // 4))
        at_second = _event_frame(rng, frames)
        scenes = [Scene(((first,) if i >= at_first else ()) + ((second,) if i >= at_second else ()))
                  for i in range(frames)]  # fmt: skip
        caption = (
            f"{_article(first.color)} {first.color} {first.shape} appears, then {_article(second.color)} {second.color} {second.shape} appears "
            f"at {at_second / fps:.1f} seconds"
        )
        question, answer = f"What appears after the {first.shape}?", f"{second.color} {second.shape}"
    elif kind == "disappear":
        staying, leaving = _two_objects(rng)
        at = _event_frame(rng, frames)
        scenes = [Scene((staying,) + ((leaving,) if i < at else ())) for i in range(frames)]
        caption = (
            f"{_article(staying.color)} {staying.color} {staying.shape} and {_article(leaving.color)} {leaving.color} {leaving.shape}; "
            f"the {leaving.shape} disappears at {at / fps:.1f} seconds"
        )
        question, answer = "Which shape disappears?", f"{leaving.color} {leaving.shape}"
    else:
        before, after = (list(COLORS)[i] for i in rng.choice(len(COLORS), 2, replace=False))
        shape = str(_pick(rng, SHAPES))
        x, y = (float(v) for v in rng.uniform(0.3, 0.7, size=2).round(4))
        at = _event_frame(rng, frames)
        scenes = [
            Scene((ShapeObject(shape, before if i < at else after, "large", x, y),)) for i in range(frames)
        ]
        caption = f"{_article(before)} {before} {shape} turns {after} at {at / fps:.1f} seconds"
        question, answer = f"What colour does the {shape} turn?", after
    return VideoSample([render(scene, size) for scene in scenes], caption, question, answer)


def write_video(
    frames: list[Image.Image], path: str | os.PathLike, fps: float, keyframe_interval: int | None = None
) -> Path:
    """Write `frames` to `path` as MP4 (H.264) or WebM (VP9), by its suffix, in yuv420p; return the path.

    `keyframe_interval` caps the frames between keyframes (the encoder's GOP size, its own default if None).
    """
    path = Path(path)
    if path.suffix not in _CODECS:
        raise InputError(f"{path}: got suffix {path.suffix!r}; expected one of {sorted(_CODECS)}")
    codec, options = _CODECS[path.suffix]
    if codec not in av.codecs_available:
        raise InputError(f"{path}: this PyAV build has no {codec} encoder; write an .mp4 instead")
    if not frames:
        raise InputError(f"{path}: got no frames; expected at least one frame to write")
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise InputError(f"{path}: frames are {width}x{height}; expected even sizes (yuv420p halves chroma)")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # a short GOP makes a clip that seeking can jump into (long videos are usually cut every 1-10 s)
        stream.options = options if keyframe_interval is None else {**options, "g": str(keyframe_interval)}
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path
