"""Video input: decode a file with PyAV, sample frames in time, encode them with a vision tower.

`read_video` is the boundary: it turns a path or encoded bytes into sampled RGB frames and their times, or
raises `InputError`. Two sampling rules, as video LMs use them:

- `fps`: one frame every 1/fps seconds from 0 (times k/fps), each the frame on screen at that time;
- `num_frames`: the centres of `num_frames` equal segments of the video, (i + 0.5) · duration / num_frames
  (the TSN / Video-LLaVA rule), so the first and last frames are never both edge frames.

At most `max_frames` frames come back; past that cap the frames are spread over the whole video, never the
first `max_frames` only. A video longer than `max_seconds` (an hour by default) is refused from its header,
before any frame is decoded.

Decoding goes forward from the start, except that a sampling time more than `SEEK_GAP_SECONDS` (2 s) past the
last decoded frame is reached by seeking to the keyframe before it and decoding forward from there, so a few
frames of a long video cost a few GOPs, not the whole file. If a seek lands on a keyframe already passed
(keyframes farther apart than the gap), later gaps up to that size are decoded forward instead. The frame
for time t is the same either way, bit for bit; a source that cannot seek, or whose index lands past t, is
decoded sequentially. `seek=False` forces sequential decoding.

`encode_frames` then turns frames into [T, N, D] tokens (PerceiverResampler's
per-frame input) and `temporal_pool` averages groups of consecutive frames.
"""

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from mmlm.errors import InputError
from mmlm.models.frame_pooling import mean_frames
from mmlm.models.vision import VisionTransformer
from mmlm.processing.image import ImageProcessor

VideoSource = str | os.PathLike | bytes | bytearray

_TIME_TOLERANCE = 1e-6  # seconds; a frame stamped at t + tolerance still counts as shown at t
# Seek to a sampling time that lies more than this past the last decoded frame; decode up to nearer ones.
# 2 s is about where a seek plus decoding from the keyframe before the target (GOPs of 1-10 s are common)
# starts to cost less than decoding every frame of the gap.
SEEK_GAP_SECONDS = 2.0


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
    source: VideoSource,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int = 64,
    max_seconds: float | None = 3600.0,
    seek: bool = True,
) -> VideoFrames:
    """Return frames of the video at `source` sampled at `fps` per second or as `num_frames` segment centres.

    Refuses a video longer than `max_seconds` (None: no cap); `seek=False` decodes every frame up to the last
    sampled time instead of seeking over long gaps.
    """
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    if (fps is None) == (num_frames is None):
        raise InputError(f"{name}: got fps={fps} and num_frames={num_frames}; expected exactly one of them")
    if fps is not None and not fps > 0:
        raise InputError(f"{name}: got fps={fps}; expected a positive frame rate")
    if num_frames is not None and num_frames < 1:
        raise InputError(f"{name}: got num_frames={num_frames}; expected at least 1")
    if max_frames < 1:
        raise InputError(f"{name}: got max_frames={max_frames}; expected at least 1")
    if max_seconds is not None and not max_seconds > 0:
        raise InputError(f"{name}: got max_seconds={max_seconds}; expected a positive duration or None")
    if isinstance(source, bytes | bytearray):
        if not source:
            raise InputError("<bytes>: got 0 bytes; expected an encoded video (MP4, WebM, ...)")
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: file not found; expected a video file")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes); expected a video file")
    try:
        try:
            with av.open(_openable(source)) as container:
                return _read(container, name, fps, num_frames, max_frames, max_seconds, seek)
        except _CannotSeek:
            # an index that misleads the seek, or a format that cannot seek: decode from the start instead
            with av.open(_openable(source)) as container:
                return _read(container, name, fps, num_frames, max_frames, max_seconds, seek=False)
    except (av.error.FFmpegError, UnicodeDecodeError) as error:  # PyAV decodes metadata as UTF-8 on open
        raise InputError(
            f"{name}: not a readable video ({error}); expected a video file (MP4, WebM, ...)"
        ) from error


def _openable(source: VideoSource) -> str | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)


class _CannotSeek(Exception):
    """Seeking did not land on a keyframe at or before the target; the caller decodes sequentially instead."""


def _read(
    container: av.container.InputContainer,
    name: str,
    fps: float | None,
    num_frames: int | None,
    max_frames: int,
    max_seconds: float | None,
    seek: bool,
) -> VideoFrames:
    if not container.streams.video:
        raise InputError(f"{name}: has no video stream (audio or data only); expected a video file")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration = _duration(container, stream)
    source_fps = float(stream.average_rate or stream.guessed_rate or 0)
    if duration is None or duration <= 0:
        raise InputError(f"{name}: has a video stream with no frames; expected at least one frame")
    if max_seconds is not None and duration > max_seconds:
        # checked before any frame is decoded: an enormous duration must not cost its decoding time
        raise InputError(
            f"{name}: lasts {duration:.1f} s, over the max_seconds={max_seconds:g} s cap; "
            "pass a larger max_seconds (or None) to read it"
        )
    times = sample_times(duration, fps, num_frames, max_frames)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if seek:
        frames = _decode_with_seeks(container, stream, times, start)
    else:
        frames = _decode_sequentially(container, stream, times, start, source_fps)
    if not frames:
        raise InputError(f"{name}: has a video stream with no decodable frames; expected at least one frame")
    return VideoFrames(frames, times, duration, source_fps)


def _decode_sequentially(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    times: list[float],
    start: float,
    source_fps: float,
) -> list[Image.Image]:
    frames: list[Image.Image] = []
    previous: tuple[float, av.VideoFrame] | None = None
    shown: Image.Image | None = None  # `previous` as RGB, converted once however many times pick it
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time - start if frame.time is not None else index / (source_fps or 1.0)
        while len(frames) < len(times) and times[len(frames)] < time - _TIME_TOLERANCE:
            # the frame on screen at times[i] is the last one that started by then (the first, if none did)
            if previous is not None:
                shown = shown or _to_image(previous[1])
                frames.append(shown)
            else:
                frames.append(_to_image(frame))
        if len(frames) == len(times):
            break
        previous, shown = (time, frame), None
    if previous is None and not frames:
        return []
    if previous is not None:
        last = shown or _to_image(previous[1])
        frames += [last] * (len(times) - len(frames))
    return frames


def _seek(container: av.container.InputContainer, stream: av.VideoStream, time: float) -> None:
    """Move the demuxer to the keyframe at or before `time` (seconds from the stream's first frame)."""
    offset = math.floor(time / stream.time_base)
    try:
        container.seek(offset, stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError as error:
        raise _CannotSeek from error


def _decode_with_seeks(
    container: av.container.InputContainer, stream: av.VideoStream, times: list[float], start: float
) -> list[Image.Image]:
    # Decode forward to each target, but jump (seek to the keyframe before it) when it lies more than
    # SEEK_GAP_SECONDS past the last decoded frame. The picking rule is the sequential one, so every target
    # gets the same frame as `_decode_sequentially`; only the frames between targets are skipped.
    def run(after_seek: bool) -> Iterator[tuple[float, av.VideoFrame]]:
        started = not after_seek
        for frame in container.decode(stream):
            if frame.time is None:
                raise _CannotSeek  # no timestamps: only the sequential path's frame count can time frames
            # frames out before the first keyframe after a seek (open-GOP leading frames) may be damaged
            started = started or frame.key_frame
            if started:
                yield frame.time - start, frame

    frames: list[Image.Image] = []
    decoded: Iterator[tuple[float, av.VideoFrame]] | None = None
    previous: tuple[float, av.VideoFrame] | None = None  # the last decoded frame at or before the target
    ahead: tuple[float, av.VideoFrame] | None = None  # a decoded frame past the target, for the next one
    converted: tuple[av.VideoFrame | None, Image.Image | None] = (None, None)
    forward_within = SEEK_GAP_SECONDS
    for target in times:
        position = (ahead or previous or (0.0, None))[0]
        if decoded is None and target <= forward_within:
            decoded = run(after_seek=False)  # from the start, as the sequential path
        elif decoded is None or target - position > forward_within:
            _seek(container, stream, target + start)
            decoded, previous, ahead = run(after_seek=True), None, None
            ahead = next(decoded, None)
            if ahead is None or ahead[0] > target + _TIME_TOLERANCE:
                raise _CannotSeek  # landed past the target (or the end): the index cannot be trusted
            if ahead[0] <= position:
                # the keyframe before the target was one already passed: keyframes lie farther apart than
                # the gap, so decode forward over gaps up to this size rather than re-decode a GOP each time
                forward_within = max(forward_within, target - ahead[0])
        while True:
            ahead = ahead or next(decoded, None)
            if ahead is None or ahead[0] > target + _TIME_TOLERANCE:
                break
            previous, ahead = ahead, None
        # the frame on screen at the target; the first frame if none started by then
        shown = previous or ahead
        if shown is None:
            return frames
        if converted[0] is not shown[1]:
            converted = (shown[1], _to_image(shown[1]))
        frames.append(converted[1])
    return frames


def _to_image(frame: av.VideoFrame) -> Image.Image:
    """Return the frame as an RGB PIL image, converted by swscale on this thread alone.

    swscale's default runs its slices on a pool of threads. A DataLoader worker forked from a process that had
    converted frames before hung in that pool's teardown (`avpriv_slicethread_free`, seen in `make test`); with
    one thread swscale starts no pool, and a frame this small gains nothing from one.
    """
    return frame.to_image(threads=1)


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
    return mean_frames(features, group)
