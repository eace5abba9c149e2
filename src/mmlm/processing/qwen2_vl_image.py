"""Qwen2-VL / Qwen2.5-VL image processing: resize to a multiple of the merge block, then flatten into patches.

The steps of transformers' `Qwen2VLImageProcessorPil` (Qwen2.5-VL uses the same one):
  1. `smart_resize`: round each side to a multiple of factor = patch_size · merge_size, keeping the pixel count
     between min_pixels and max_pixels (scaled down or up with the aspect ratio kept), then a PIL bicubic resize
     on 8-bit RGB (`Qwen2VLResize`, the processor's tiling step: one view per image, its grid in patches);
  2. rescale and normalise (CLIP mean and std), as `ImageProcessor`;
  3. flatten (`Qwen2VLPatches`): the h × w patch grid is laid out block by block (each merge_size² consecutive
     patches a square block, which the patch merger merges), each patch repeated temporal_patch_size times as
     a still video's frames, [h·w, C·t·p·p]; a batch's images are concatenated, with grids (1, h, w) each.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.anyres import TiledImage
from mmlm.processing.image import MAX_PIXELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, load_image

HF_TYPES = ("Qwen2VLImageProcessor",)
MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses a longer side over 200 times the shorter


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Return the (height, width), both multiples of `factor`, that transformers' `smart_resize` picks."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image: {height}x{width} has an aspect ratio of {max(height, width) / min(height, width):.1f}; "
            f"Qwen2-VL takes at most {MAX_ASPECT_RATIO}"
        )
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if h_bar * w_bar < min_pixels:  # only when max_pixels is near min_pixels; transformers goes on regardless
        raise InputError(
            f"image: {height}x{width} resizes to {h_bar}x{w_bar}, below min_pixels={min_pixels}; expected "
            f"max_pixels well above min_pixels (got {max_pixels})"
        )
    return h_bar, w_bar


@dataclass
class Qwen2VLResize:
    """The resize step: one view per image, sides multiples of patch_size · merge_size, pixels in range."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise InputError(
                f"min_pixels, max_pixels: got {self.min_pixels}, {self.max_pixels}; expected 0 < min <= max"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) an image of this size is resized to."""
        return smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Return the (rows, columns) of patches of an image of this size."""
        h, w = self.resized_size(height, width)
        return h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Return the LM tokens an image of this size becomes, rows · columns / merge_size²."""
        rows, cols = self.grid(height, width)
        return rows * cols // self.merge_size**2

    def num_tiles(self, height: int, width: int) -> int:
        """Return 1: an image is one view at its own resolution."""
        return 1

    def __call__(self, image: Image.Image) -> TiledImage:
        """Return the image resized, as one view, with its patch grid (rows, columns)."""
        height, width = self.resized_size(image.height, image.width)
        view = (
            image
            if (height, width) == (image.height, image.width)
            else image.resize((width, height), self.resample)
        )
        return TiledImage(
            [view], (height // self.patch_size, width // self.patch_size), (image.height, image.width)
        )


@dataclass
class Qwen2VLPatches:
    """Rescale, normalise and flatten already-resized views into packed patches [N, C·t·p·p]."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    max_pixels: int = MAX_PIXELS  # the decoder's guard against decompression bombs (load_image), not a resize

    def values(self) -> np.ndarray:
        """Return the [3, 256] float32 value of each uint8 level per channel (ImageProcessor's arithmetic)."""
        return ImageProcessor(
            "exact", 1, None, self.mean, self.std, self.rescale_factor, do_resize=False,
            do_rescale=self.do_rescale, do_normalize=self.do_normalize,
        ).value_table()  # fmt: skip

    def flatten(self, pixels: np.ndarray, table: np.ndarray) -> torch.Tensor:
        """Return one view's patches [h·w, C·t·p·p] from uint8 pixels [H, W, 3], merge block by merge block."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width = pixels.shape[:2]
        if height % (p * m) or width % (p * m):
            raise InputError(
                f"image: {height}x{width} px; expected sides that are multiples of {p * m} (resize first)"
            )
        values = table[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # [3, H, W] float32
        rows, cols = height // p, width // p
        x = values.reshape(3, rows // m, m, p, cols // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image: t equal frames
        return torch.from_numpy(np.ascontiguousarray(x).reshape(rows * cols, 3 * t * p * p))

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """Return the views' patches concatenated, [Σ h·w, C·t·p·p] float32."""
        if len(images) == 0:
            raise InputError("images: got an empty list; expected at least one image")
        table = self.values()
        return torch.cat([self.flatten(np.asarray(load_image(i, self.max_pixels)), table) for i in images])


def _pixels(settings: Mapping[str, Any], key: str, size_key: str, default: int) -> int:
    size = settings.get("size") or {}
    value = settings.get(key, size.get(size_key, default) if isinstance(size, Mapping) else default)
    if not isinstance(value, int) or value < 1:
        raise InputError(f"{key}: got {value!r}; expected a positive number of pixels")
    return value


def qwen2_vl_processing_from_hf(settings: Mapping[str, Any]) -> tuple[Qwen2VLResize, Qwen2VLPatches]:
    """Return the resize step and the patch flattening of a Qwen2VLImageProcessor's preprocessor settings."""
    patch, merge = int(settings.get("patch_size", 14)), int(settings.get("merge_size", 2))
    resize = Qwen2VLResize(
        # transformers 5 writes size {"shortest_edge": min_pixels, "longest_edge": max_pixels}; 4.x min/max_pixels
        min_pixels=_pixels(settings, "min_pixels", "shortest_edge", 56 * 56),
        max_pixels=_pixels(settings, "max_pixels", "longest_edge", 28 * 28 * 1280),
        patch_size=patch, merge_size=merge, resample=int(settings.get("resample", Image.Resampling.BICUBIC)),
    )  # fmt: skip
    patches = Qwen2VLPatches(
        patch_size=patch, temporal_patch_size=int(settings.get("temporal_patch_size", 2)), merge_size=merge,
        mean=tuple(settings.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(settings.get("image_std", OPENAI_CLIP_STD)),
        rescale_factor=float(settings.get("rescale_factor", 1 / 255)), do_rescale=bool(settings.get("do_rescale", True)),
        do_normalize=bool(settings.get("do_normalize", True)),
    )  # fmt: skip
    if not settings.get("do_resize", True):
        raise InputError("do_resize: false; mmlm's Qwen2-VL processing always resizes to the merge block")
    return resize, patches


def qwen2_vl_processing_to_hf(resize: Qwen2VLResize, patches: Qwen2VLPatches) -> dict[str, Any]:
    """Return a preprocessor_config.json dict that transformers' Qwen2VLImageProcessor loads."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": int(resize.resample),
        "size": {"shortest_edge": resize.min_pixels, "longest_edge": resize.max_pixels},
        "min_pixels": resize.min_pixels, "max_pixels": resize.max_pixels, "patch_size": patches.patch_size,
        "temporal_patch_size": patches.temporal_patch_size, "merge_size": patches.merge_size,
        "do_rescale": patches.do_rescale, "rescale_factor": patches.rescale_factor,
        "do_normalize": patches.do_normalize, "image_mean": list(patches.mean), "image_std": list(patches.std),
        "do_convert_rgb": True,
    }  # fmt: skip
