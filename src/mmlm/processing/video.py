"""Video input: decode a file with PyAV, sample frames in time, encode them with a vision tower.

`read_video` is the boundary: it turns a path or encoded bytes into sampled RGB frames and their times, or
raises `InputError`. Two sampling rules, as video LMs use them:

- `fps`: one frame every 1/fps seconds from 0 (times k/fps), each the frame on screen at that time;
- `num_frames`: the centres of `num_frames` equal segments of the video, (i + 0.5) · duration / num_frames
  (the TSN / Video-LLaVA rule), so the first and last frames are never both edge frames.

At most `max_frames` frames come back; past that cap the frames are spread over the whole video, never the
first `max_frames` only. `encode_frames` then turns frames into [T, N, D] tokens (PerceiverResampler's
per-frame input) and `temporal_pool` averages groups of consecutive frames.
"""

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from mmlm.encoders.vision import VisionTransformer
from mmlm.errors import InputError
from mmlm.processing.image import ImageProcessor

VideoSource = str | os.PathLike | bytes | bytearray

_TIME_TOLERANCE = 1e-6  # seconds; a frame stamped at t + tolerance still counts as shown at t


@dataclass
class VideoFrames:
    """Sampled frames of a video: RGB images, their times in seconds, the duration and the source frame rate."""

    frames: list[Image.Image]
    timestamps: list[float]  # the sampling times; frames[i] is the frame on screen at timestamps[i]
    duration: float  # seconds
    fps: float  # the source's average frame rate


def sample_times(duration: float, fps: float | None, num_frames: int | None, max_frames: int) -> list[float]:
    """Return the sampling times in seconds: k/fps from 0, or segment centres, at most max_frames of them."""
    if num_frames is not None:
        n = min(num_frames, max_frames)
        return [(i + 0.5) * duration / n for i in range(n)]
    assert fps is not None
    # k/fps for every k with k/fps < duration; the tolerance keeps duration = n/fps from adding frame n
    count = max(1, math.ceil(duration * fps - 1e-9))
    ks = np.arange(count) if count <= max_frames else np.linspace(0, count - 1, max_frames).round()
    return [int(k) / fps for k in ks]


def read_video(
    source: VideoSource, fps: float | None = None, num_frames: int | None = None, max_frames: int = 64
) -> VideoFrames:
    """Return frames of the video at `source` sampled at `fps` per second or as `num_frames` segment centres."""
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    if (fps is None) == (num_frames is None):
        raise InputError(f"{name}: got fps={fps} and num_frames={num_frames}; expected exactly one of them")
    if fps is not None and not fps > 0:
        raise InputError(f"{name}: got fps={fps}; expected a positive frame rate")
    if num_frames is not None and num_frames < 1:
        raise InputError(f"{name}: got num_frames={num_frames}; expected at least 1")
    if max_frames < 1:
        raise InputError(f"{name}: got max_frames={max_frames}; expected at least 1")
    if isinstance(source, bytes | bytearray):
        if not source:
            raise InputError("<bytes>: got 0 bytes; expected an encoded video (MP4, WebM, ...)")
        stream_or_path: str | io.BytesIO = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: file not found; expected a video file")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes); expected a video file")
        stream_or_path = str(path)
    try:
        with av.open(stream_or_path) as container:
            return _read(container, name, fps, num_frames, max_frames)
    except av.error.FFmpegError as error:
        raise InputError(
            f"{name}: not a readable video ({error}); expected a video file (MP4, WebM, ...)"
        ) from error


def _read(
    container: av.container.InputContainer,
    name: str,
    fps: float | None,
    num_frames: int | None,
    max_frames: int,
) -> VideoFrames:
    if not container.streams.video:
        raise InputError(f"{name}: has no video stream (audio or data only); expected a video file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration = _duration(container, stream)
    source_fps = float(stream.average_rate or stream.guessed_rate or 0)
    if duration is None or duration <= 0:
        raise InputError(f"{name}: has a video stream with no frames; expected at least one frame")
    times = sample_times(duration, fps, num_frames, max_frames)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    frames: list[Image.Image] = []
    previous: tuple[float, av.VideoFrame] | None = None
    shown: Image.Image | None = None  # `previous` as RGB, converted once however many times pick it
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time - start if frame.time is not None else index / (source_fps or 1.0)
        while len(frames) < len(times) and times[len(frames)] < time - _TIME_TOLERANCE:
            # the frame on screen at times[i] is the last one that started by then (the first, if none did)
            if previous is not None:
                shown = shown or previous[1].to_image()
                frames.append(shown)
            else:
                frames.append(frame.to_image())
        if len(frames) == len(times):
            break
        previous, shown = (time, frame), None
    if previous is None and not frames:
        raise InputError(f"{name}: has a video stream with no decodable frames; expected at least one frame")
    if previous is not None:
        last = shown or previous[1].to_image()
        frames += [last] * (len(times) - len(frames))
    return VideoFrames(frames, times, duration, source_fps)


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    # no duration in the header (some WebM/MKV): the end of the last packet, read without decoding
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end or 0.0, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    container.seek(0)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return None if end is None else end - start


@torch.no_grad()
def encode_frames(
    vision: VisionTransformer,
    image_processor: ImageProcessor,
    frames: list[Image.Image],
    batch_size: int = 32,
) -> torch.Tensor:
    """Return the vision tower's final-normed tokens of each frame, [T, N(+1), D], encoded batch_size at a time."""
    if not frames:
        raise InputError("frames: got an empty list; expected at least one frame")
    chunks = []
    for begin in range(0, len(frames), batch_size):
        pixels = image_processor(frames[begin : begin + batch_size])  # [b, 3, H, W]
        chunks.append(vision.forward_features(pixels)[0])  # [b, N(+1), D]
    return torch.cat(chunks)


def temporal_pool(features: torch.Tensor, group: int) -> torch.Tensor:
    """Return the mean over each `group` consecutive frames, [T, N, D] -> [ceil(T / group), N, D]."""
    if group < 1:
        raise InputError(f"group: got {group}; expected at least 1 frame per group")
    return torch.stack([chunk.mean(0) for chunk in features.split(group)])
