"""Idefics3 / SmolVLM image splitting: resize the longest edge, cut into max_image_size tiles, add a global view.

The steps of transformers' `Idefics3ImageProcessorPil` (SmolVLM's is the same code), all on 8-bit RGB with PIL
and its LANCZOS filter:
  1. resize so the longest edge is `longest_edge` (the other side keeps the aspect ratio, floored, then
     rounded up to even), then cap both sides at 4096;
  2. with splitting: resize up to multiples of the tile side M (`max_image_size`) and, if larger than one tile,
     cut rows × cols tiles in row-major order, then add the whole image squashed to M × M as the global view,
     last; an image that fits one tile stays one M × M view with grid (0, 0);
  3. without splitting: squash to one M × M view.
Rescaling and normalising (mean = std = 0.5) are `ImageProcessor`'s. Every view is M × M, so transformers' batch
padding (zero images, `pixel_attention_mask`) only pads the number of views per sample: `pad_views` writes that
layout; the model takes the views unpadded.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.anyres import TiledImage
from mmlm.processing.image import ImageProcessor

MAX_IMAGE_SIZE = 4096  # transformers' cap on either side after the longest-edge resize
HF_TYPES = ("Idefics3ImageProcessor", "SmolVLMImageProcessor")


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Return the (height, width) with the longest edge at `longest_edge`, the other side even, both <= 4096."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height  # transformers' second step: scale down below MAX_IMAGE_SIZE
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Return the (height, width) rounded up to multiples of `tile`, the longer side first (as transformers)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass
class Idefics3Splitting:
    """Idefics3's image splitting: `max_image_size` tiles of an image first resized to `longest_edge`."""

    max_image_size: int = 364
    longest_edge: int | None = 4 * 364  # None: no first resize (do_resize false)
    do_image_splitting: bool = True
    resample: int = Image.Resampling.LANCZOS

    def __post_init__(self) -> None:
        if self.max_image_size < 1 or (self.longest_edge is not None and self.longest_edge < 1):
            raise InputError(
                f"max_image_size, size.longest_edge: got {self.max_image_size}, {self.longest_edge}; "
                "expected positive numbers of pixels"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) an image of this size has before it is cut."""
        if self.longest_edge is not None:
            height, width = longest_edge_size(height, width, self.longest_edge)
        if not self.do_image_splitting:
            return self.max_image_size, self.max_image_size
        return tile_multiple_size(height, width, self.max_image_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Return the (rows, cols) of tiles an image of this size is cut into; (0, 0): one view, not split."""
        height, width = self.resized_size(height, width)
        tile = self.max_image_size
        if not self.do_image_splitting or (height <= tile and width <= tile):
            return 0, 0
        return height // tile, width // tile

    def num_tiles(self, height: int, width: int) -> int:
        """Return how many views (tiles plus the global view) an image of this size becomes."""
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def _resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        return (
            image if image.size == (width, height) else image.resize((width, height), resample=self.resample)
        )

    def __call__(self, image: Image.Image) -> TiledImage:
        """Return the image's views in prompt order: rows × cols tiles (row-major), then the global view."""
        size = (image.height, image.width)
        if self.longest_edge is not None:
            image = self._resize(image, *longest_edge_size(image.height, image.width, self.longest_edge))
        tile = self.max_image_size
        if not self.do_image_splitting:
            return TiledImage([self._resize(image, tile, tile)], (0, 0), size)
        image = self._resize(image, *tile_multiple_size(image.height, image.width, tile))
        if image.height <= tile and image.width <= tile:
            return TiledImage([image], (0, 0), size)
        rows, cols = image.height // tile, image.width // tile
        tiles = [
            image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
            for r in range(rows)
            for c in range(cols)
        ]
        return TiledImage([*tiles, self._resize(image, tile, tile)], (rows, cols), size)


def _longest_edge(value: Any, field: str) -> int:
    if isinstance(value, Mapping) and isinstance(value.get("longest_edge"), int):
        return value["longest_edge"]
    raise InputError(f"{field}: got {value!r}; expected {{'longest_edge': N}}")


def idefics3_processing_from_hf(config: Mapping[str, Any]) -> tuple[Idefics3Splitting, ImageProcessor]:
    """Return the splitting and the per-view rescale/normalise of a transformers Idefics3/SmolVLM image processor
    config (preprocessor_config.json, or processor_config.json's "image_processor")."""
    kind = str(config.get("image_processor_type", HF_TYPES[0])).removesuffix("Pil").removesuffix("Fast")
    if kind not in HF_TYPES:
        raise InputError(f"image_processor_type: got {kind!r}; expected one of {HF_TYPES}")
    tile = _longest_edge(config.get("max_image_size", {"longest_edge": 364}), "max_image_size")
    resize = bool(config.get("do_resize", True))
    longest = _longest_edge(config.get("size", {"longest_edge": 4 * 364}), "size") if resize else None
    resample = int(config.get("resample", Image.Resampling.LANCZOS))
    splitting = Idefics3Splitting(tile, longest, bool(config.get("do_image_splitting", True)), resample)
    per_view = ImageProcessor(
        resize_mode="exact", size=tile, crop_size=None, mean=config.get("image_mean", (0.5, 0.5, 0.5)),
        std=config.get("image_std", (0.5, 0.5, 0.5)), rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        do_rescale=bool(config.get("do_rescale", True)), do_normalize=bool(config.get("do_normalize", True)),
        resample=resample, hf_type=kind,
    )  # fmt: skip
    return splitting, per_view


def idefics3_processing_to_hf(splitting: Idefics3Splitting, per_view: ImageProcessor) -> dict[str, Any]:
    """Return a preprocessor_config.json dict that transformers reads as this Idefics3 image processor."""
    return {
        "image_processor_type": per_view.hf_type, "do_convert_rgb": True,
        "do_resize": splitting.longest_edge is not None,
        "size": {"longest_edge": splitting.longest_edge or 4 * splitting.max_image_size},
        "max_image_size": {"longest_edge": splitting.max_image_size},
        "do_image_splitting": splitting.do_image_splitting, "resample": int(splitting.resample),
        "do_rescale": per_view.do_rescale, "rescale_factor": per_view.rescale_factor,
        "do_normalize": per_view.do_normalize, "image_mean": list(per_view.mean), "image_std": list(per_view.std),
        "do_pad": True,
    }  # fmt: skip


def pad_views(views: torch.Tensor, per_sample: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return transformers' padded layout of flat views [V, 3, H, W] with `per_sample` views per prompt:
    pixel_values [B, max views, 3, H, W] (zero images pad) and pixel_attention_mask [B, max views, H, W] long."""
    if sum(per_sample) != len(views):
        raise InputError(f"per_sample: {list(per_sample)} counts {sum(per_sample)} views, got {len(views)}")
    most = max(per_sample, default=0)
    pixels = views.new_zeros(len(per_sample), most, *views.shape[1:])
    mask = torch.zeros(len(per_sample), most, *views.shape[2:], dtype=torch.long)
    for b, chunk in enumerate(views.split(list(per_sample))):
        pixels[b, : len(chunk)] = chunk
        mask[b, : len(chunk)] = 1
    return pixels, mask
