"""Qwen2-VL / Qwen2.5-VL videos: frames -> temporal patches, and `<|video_pad|>` slots in prompts.

transformers' `Qwen2VLVideoProcessor` (it needs torchvision; this follows its code) does per video:
  1. one `smart_resize` for all frames (they share a size), with the video settings' min/max pixels, then the
     image processor's per-frame resize, rescale and normalise (here PIL bicubic on 8-bit RGB, as the image
     path; transformers' video path resizes with torchvision, a deliberate difference noted in docs/parity.md);
  2. a frame count not divisible by temporal_patch_size is padded by repeating the last frame;
  3. `patchify`: frames [F, C, H, W] -> [F/tp · h · w, C · tp · p · p], temporal patch by temporal patch, each
     laid out merge block by merge block as an image; grid (F/tp, h, w).
So temporal patch g at patch n holds, for k < tp, frame g·tp + k's image-path patch n (whose tp copies are
equal), and a 1-frame video equals the image path: the image path is a still video of tp equal frames.

In the prompt each video is `<|vision_start|><|video_pad|><|vision_end|>` (a `{"type": "video"}` part or
mmlm's `<video>` become that), and `<|video_pad|>` is repeated t·h·w/merge_size² times (`replace_video_token`).
Qwen2.5-VL also needs each video's seconds per temporal patch, temporal_patch_size / sampled fps
(`Qwen2_5_VLProcessor._process_videos`).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.image import load_image
from mmlm.processing.qwen2_vl_image import Qwen2VLPatches, Qwen2VLResize, qwen2_vl_processing_from_hf
from mmlm.processing.qwen2_vl_prompt import VISION_END, VISION_START
from mmlm.processing.video import read_video
from mmlm.processing.video_prompt import VIDEO_TOKEN
from mmlm.processing.vlm_processor import IGNORE_INDEX, VLMProcessor

VIDEO_PAD = "<|video_pad|>"
VIDEO_PART = VISION_START + VIDEO_PAD + VISION_END
# transformers' VideoMetadata.sampled_fps for frames given without their times
DEFAULT_FPS = 24.0


@dataclass
class Qwen2VLVideo:
    """One processed video: patches [t·h·w, C·tp·p·p], grid (t, h, w) in patches, seconds per temporal patch."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    second_per_grid: float


@dataclass
class Qwen2VLVideoProcessing:
    """The video processor: one shared resize of a video's frames, then temporal patches of tp frames."""

    resize: Qwen2VLResize
    patches: Qwen2VLPatches

    def flatten(self, frames: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Return frames of one size (already resized) as patches [t·h·w, C·tp·p·p] and their grid (t, h, w)."""
        p, m, tp = self.patches.patch_size, self.patches.merge_size, self.patches.temporal_patch_size
        table = self.patches.values()  # [3, 256]
        pixels = np.stack([np.asarray(f) for f in frames]).transpose(0, 3, 1, 2)  # [F, 3, H, W] uint8
        if pad := -len(frames) % tp:  # transformers repeats the last frame up to a whole temporal patch
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        values = table[np.arange(3)[None, :, None, None], pixels]  # [F, 3, H, W] float32
        f, _, height, width = values.shape
        t, rows, cols = f // tp, height // p, width // p
        x = values.reshape(t, tp, 3, rows // m, m, p, cols // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, tp, p, p]
        return torch.from_numpy(np.ascontiguousarray(x).reshape(t * rows * cols, 3 * tp * p * p)), (
            t,
            rows,
            cols,
        )

    def __call__(self, frames: Sequence[Any], fps: float = DEFAULT_FPS) -> Qwen2VLVideo:
        """Return a video's patches, grid and seconds per temporal patch from its frames sampled at `fps`."""
        if not frames:
            raise InputError("videos: a video with no frames; expected at least one")
        loaded = [load_image(f, self.patches.max_pixels) for f in frames]
        sizes = {(f.height, f.width) for f in loaded}
        if len(sizes) > 1:
            raise InputError(
                f"videos: frames of different sizes {sorted(sizes)}; expected one size per video"
            )
        height, width = self.resize.resized_size(loaded[0].height, loaded[0].width)
        if (height, width) != (loaded[0].height, loaded[0].width):
            loaded = [f.resize((width, height), self.resize.resample) for f in loaded]
        patches, grid = self.flatten(loaded)
        return Qwen2VLVideo(patches, grid, self.patches.temporal_patch_size / fps)


def qwen2_vl_video_from_hf(
    video_settings: Mapping[str, Any] | None, image_settings: Mapping[str, Any]
) -> Qwen2VLVideoProcessing:
    """Return the video processing of a folder: the video processor's settings where it has them (min/max
    pixels above all), else the image processor's."""
    settings = dict(image_settings)
    if video_settings:
        for key in ("size", "min_pixels", "max_pixels"):  # the video's pixel range replaces the image's whole
            settings.pop(key, None)
        settings.update(video_settings)
    return Qwen2VLVideoProcessing(*qwen2_vl_processing_from_hf(settings))


def sample_clip(source: Any, num_frames: int, video_fps: float | None) -> tuple[list[Any], float]:
    """Return a video's frames and their sampling rate: a file's sampled as mmlm's other video models sample
    them (`num_frames` uniform, or at `video_fps`), or a list of frames as given (at transformers' 24 fps)."""
    if isinstance(source, list | tuple):
        return list(source), DEFAULT_FPS
    if video_fps is not None:
        return read_video(source, fps=video_fps, max_frames=num_frames).frames, video_fps
    clip = read_video(source, num_frames=num_frames)
    return clip.frames, len(clip.frames) / clip.duration  # transformers' sampled_fps: frames / duration


def with_video_placeholders(prompt: Any, videos: Sequence[Any]) -> tuple[Any, list[Any]]:
    """Return the prompt with each video written as Qwen's `<|vision_start|><|video_pad|><|vision_end|>` and
    the videos in prompt order (a video part's own "video" source, else the next of `videos`)."""
    pending = iter(videos)
    order: list[Any] = []

    def next_video() -> Any:
        try:
            return next(pending)
        except StopIteration:
            raise InputError("videos: more video placeholders than videos given") from None

    if isinstance(prompt, str):
        prompt = prompt.replace(VIDEO_TOKEN, VIDEO_PART)
        order = [next_video() for _ in range(prompt.count(VIDEO_PAD))]
    else:
        messages = []
        for message in prompt:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                content = content.replace(VIDEO_TOKEN, VIDEO_PART)
                order += [next_video() for _ in range(content.count(VIDEO_PAD))]
            elif isinstance(content, list | tuple):
                parts = []
                for part in content:
                    if isinstance(part, Mapping) and part.get("type") == "video":
                        order.append(part["video"] if part.get("video") is not None else next_video())
                        part = {"type": "text", "text": VIDEO_PART}  # what Qwen's template writes for it
                    parts.append(part)
                content = parts
            messages.append(message if content is None else {**message, "content": content})
        prompt = messages
    if next(pending, None) is not None:
        raise InputError(
            f"videos: got {len(videos)} video(s) but fewer {VIDEO_PAD} placeholders / video parts"
        )
    return prompt, order


def expand_video_slots(ids: torch.Tensor, video_token_id: int, grids: Sequence[tuple[int, int, int]],
                       merge_size: int) -> torch.Tensor:  # fmt: skip
    """Return ids [L] with the k-th `<|video_pad|>` repeated t·h·w/merge_size² times for video k's grid."""
    is_video = ids == video_token_id
    if int(is_video.sum()) != len(grids):
        raise InputError(
            f"videos: got {len(grids)} video(s) for {int(is_video.sum())} {VIDEO_PAD} placeholder(s)"
        )
    repeats = torch.ones_like(ids)
    repeats[is_video] = torch.tensor([t * h * w // merge_size**2 for t, h, w in grids], dtype=torch.long)
    return ids.repeat_interleave(repeats)


def qwen2_vl_batch(processor: VLMProcessor, video_processing: Qwen2VLVideoProcessing, video_token_id: int,
                   prompts: Sequence[Any], images: Sequence[Sequence[Any]] | None,
                   videos: Sequence[Sequence[Any]] | None, num_frames: int = 8,
                   video_fps: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Return a left-padded generation batch (VLMProcessor.collate's keys) plus the videos': video_values
    [N, C·tp·p·p] or None, video_grid [V, 3] long, second_per_grid [V] float32."""
    samples, clips = [], []
    for i, prompt in enumerate(prompts):
        prompt, sources = with_video_placeholders(prompt, videos[i] if videos is not None else [])
        sample = processor.encode(
            prompt, images[i] if images is not None else None, add_generation_prompt=True
        )
        if sample is None:
            raise InputError(
                f"max_length: a prompt's image tokens do not fit in {processor.max_length} tokens"
            )
        ours = [video_processing(*sample_clip(s, num_frames, video_fps)) for s in sources]
        sample.input_ids = expand_video_slots(
            sample.input_ids, video_token_id, [c.grid for c in ours], video_processing.patches.merge_size
        )
        sample.labels = torch.full_like(sample.input_ids, IGNORE_INDEX)  # generation: no answers to learn
        samples.append(sample)
        clips += ours
    batch = processor.collate(samples, "left")
    batch["video_values"] = torch.cat([c.patches for c in clips]) if clips else None
    batch["video_grid"] = torch.tensor([c.grid for c in clips], dtype=torch.long).reshape(-1, 3)
    batch["second_per_grid"] = torch.tensor([c.second_per_grid for c in clips], dtype=torch.float32)
    return batch


def video_settings_file(folder: Path) -> Path:
    """Return where transformers writes a folder's video processor settings."""
    return folder / "video_preprocessor_config.json"
