"""SigLIP 2's NaFlex preprocessing: each image keeps its aspect ratio, as a sequence of at most N patches.

The image is resized so that its patch grid is as large as fits in `max_num_patches` (each side a multiple of the
patch size, at least one patch), normalised, cut into patches row by row (each patch flattened as row, column,
channel) and padded to `max_num_patches`, with a mask over the padding and each image's grid (rows, columns).
The numbers equal transformers' `Siglip2ImageProcessorPil`: the same binary search for the scale, PIL's resize on
8-bit pixels, rescaling in float64 then normalising in float32 (`ImageProcessor.value_table`).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmlm.errors import InputError
from mmlm.models.vision import PatchBatch
from mmlm.processing.image import MAX_PIXELS, SIGLIP_MEAN, SIGLIP_STD, ImageProcessor, ImageSource, load_image

HF_TYPE = "Siglip2ImageProcessor"
_HF_KEYS = {
    "image_processor_type", "processor_class", "do_convert_rgb", "do_resize", "resample", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "patch_size", "max_num_patches",
}  # fmt: skip


def size_for_max_patches(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """Return the (height, width) an image is resized to: the largest scale (binary search to 1e-5) whose grid of
    ceil-rounded patches fits in `max_num_patches`, each side at least one patch."""

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = 1e-6, 100.0
    while high - low >= 1e-5:
        scale = (low + high) / 2
        if (side(scale, height) / patch_size) * (side(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


@dataclass
class NaFlexProcessor:
    """Resize within a patch budget, normalise and patchify images the way a SigLIP 2 NaFlex checkpoint expects."""

    patch_size: int = 16
    max_num_patches: int = 256
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BILINEAR
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.max_num_patches < 1:
            raise InputError(
                f"patch_size and max_num_patches: got {self.patch_size} and {self.max_num_patches}; expected ≥ 1"
            )
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "NaFlexProcessor":
        """Return the processor a transformers Siglip2ImageProcessor config dict describes."""
        if unknown := sorted(set(config) - _HF_KEYS):
            raise InputError(f"{HF_TYPE} config: unknown keys {unknown}")
        base = cls()
        three = ImageProcessor(
            mean=config.get("image_mean", base.mean), std=config.get("image_std", base.std)
        )
        return cls(
            patch_size=int(config.get("patch_size", base.patch_size)),
            max_num_patches=int(config.get("max_num_patches", base.max_num_patches)),
            mean=three.mean,
            std=three.std,
            rescale_factor=float(config.get("rescale_factor", base.rescale_factor)),
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            do_normalize=bool(config.get("do_normalize", True)),
            resample=int(config.get("resample", base.resample)),
        )

    def to_hf(self) -> dict[str, Any]:
        """Return this processor as a preprocessor_config.json dict that transformers loads."""
        return {
            "image_processor_type": HF_TYPE, "do_convert_rgb": True, "do_resize": self.do_resize,
            "resample": int(self.resample), "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": list(self.mean), "image_std": list(self.std),
            "patch_size": self.patch_size, "max_num_patches": self.max_num_patches,
        }  # fmt: skip

    def patches(self, image: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        """Return one image's patches as uint8 [rows·columns, p·p·3] and its grid (rows, columns)."""
        image = load_image(image, self.max_pixels)
        p = self.patch_size
        if self.do_resize:
            height, width = size_for_max_patches(image.height, image.width, p, self.max_num_patches)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, 3]
        rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
        if rows * cols == 0 or rows * cols > self.max_num_patches:
            raise InputError(
                f"image of {pixels.shape[1]}x{pixels.shape[0]} gives a {rows}x{cols} patch grid; expected 1 to "
                f"{self.max_num_patches} patches of {p} px (set do_resize)"
            )
        grid = pixels[: rows * p, : cols * p].reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        return grid.reshape(rows * cols, p * p * 3), (rows, cols)

    def __call__(self, images: Sequence[ImageSource]) -> PatchBatch:
        """Return `images` as a PatchBatch: float32 patches [B, max_num_patches, p·p·3], mask and grids."""
        if len(images) == 0:
            raise InputError("images: got an empty list; expected at least one image")
        table = ImageProcessor(
            mean=self.mean, std=self.std, rescale_factor=self.rescale_factor, do_rescale=self.do_rescale,
            do_normalize=self.do_normalize,
        ).value_table()  # fmt: skip
        channel = np.arange(3)
        out = np.zeros((len(images), self.max_num_patches, self.patch_size**2 * 3), np.float32)
        mask = np.zeros((len(images), self.max_num_patches), bool)
        shapes = []
        for i, image in enumerate(images):
            patches, grid = self.patches(image)
            n = len(patches)
            values = patches.reshape(n, -1, 3)  # [n, p·p, 3] uint8
            out[i, :n] = table[channel, values].reshape(n, -1)
            mask[i, :n] = True
            shapes.append(grid)
        return PatchBatch(
            torch.from_numpy(out), torch.from_numpy(mask), torch.tensor(shapes, dtype=torch.long)
        )
