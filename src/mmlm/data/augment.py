"""Image transforms that PairDataset applies: training augmentation, and inference preprocessing for validation.

Both use the inference stack of `mmlm.processing.image`: `load_image` to decode (with JPEG draft mode) and PIL
to resize. They stop at uint8 pixels: the trainer normalises them on its device (`PixelNormalize`), so loader
workers, pinned memory and the host-to-device copy carry a quarter of float32's bytes, and a crop of the whole
image still gives exactly the numbers inference gives. No torchvision.

A transform takes (image, caption, rng) and returns (pixels [3, H, W] uint8, caption). It gets the caption
because a horizontal flip can make a caption false, and the rng because each sample's randomness comes from
PairDataset's per-sample generator, which is what makes augmentation deterministic and resumable.
"""

import math
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.image import MAX_PIXELS, ImageProcessor, ImageSource, load_image

# A word that starts with left or right ("left", "rightmost", "left-hand"); also catches "all right" and
# "rightly", which only costs those samples their flip.
_SIDE_WORD = re.compile(r"\b(left|right)", re.IGNORECASE)


class PairTransform(Protocol):
    """Turns one image and its caption into (pixels [3, H, W] uint8, caption), drawing randomness from rng."""

    def __call__(
        self, image: ImageSource, caption: str, rng: np.random.Generator
    ) -> tuple[torch.Tensor, str]: ...


def mentions_side(caption: str) -> bool:
    """Return whether the caption says left or right, so a mirrored image would contradict it."""
    return _SIDE_WORD.search(caption) is not None


@dataclass
class TrainTransform:
    """Random resized crop and optional horizontal flip, to a uint8 [3, H, W] tensor (normalised on the device).

    The crop follows torchvision's RandomResizedCrop: an area fraction in `scale` and a log-uniform aspect
    ratio in `ratio`, ten tries, then a centre crop clamped to `ratio`. The default scale (0.9, 1.0) is
    open_clip's for CLIP training; torchvision's ImageNet default is (0.08, 1.0).

    The flip is off by default. When on, a sample whose caption mentions left or right is never flipped (the
    caption is left as it is): swapping the words instead would turn "he left the room" into "he right the
    room". Mirrored text in an image (OCR captions) is another reason to keep it off.
    """

    size: int | tuple[int, int] = 224  # output (height, width)
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    resample: int = Image.Resampling.BICUBIC
    # JPEG DCT-domain downscaling (Image.draft): several times faster on big photos; the decoded image stays at
    # least twice the output size, so the bicubic resize still averages over the draft's pixels.
    fast_decode: bool = True
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        self.size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise InputError(f"size: got {self.size!r}; expected a positive int or (height, width)")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise InputError(f"scale: got {self.scale!r}; expected (min, max) with 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise InputError(f"ratio: got {self.ratio!r}; expected (min, max) with 0 < min <= max")

    def draft_size(self) -> tuple[int, int] | None:
        """Return the (width, height) a JPEG may be draft-decoded down to, or None without fast_decode."""
        side = 2 * max(self.size)
        return (side, side) if self.fast_decode else None  # square, so it holds whatever the EXIF orientation

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Return a random crop (left, top, crop_width, crop_height) of a width x height image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(rng.integers(0, height - crop_height + 1))
                left = int(rng.integers(0, width - crop_width + 1))
                return left, top, crop_width, crop_height
        # torchvision's fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred
        if width / height < self.ratio[0]:
            crop_width, crop_height = width, round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            crop_width, crop_height = round(height * self.ratio[1]), height
        else:
            crop_width, crop_height = width, height
        return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height

    def __call__(
        self, image: ImageSource, caption: str, rng: np.random.Generator
    ) -> tuple[torch.Tensor, str]:
        """Return (a random crop of the image, resized, as uint8 [3, H, W], the caption)."""
        image = load_image(image, self.max_pixels, self.draft_size())
        left, top, crop_width, crop_height = self.crop_box(image.width, image.height, rng)
        height, width = self.size
        # PIL crops and resizes in one pass, filtering over the box in the source's full resolution
        box = (left, top, left + crop_width, top + crop_height)
        pixels = np.asarray(image.resize((width, height), resample=self.resample, box=box))  # [H, W, 3] uint8
        if self.flip and rng.random() < 0.5 and not mentions_side(caption):
            pixels = pixels[:, ::-1]
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), caption  # [H, W, 3] -> [3, H, W]


@dataclass
class EvalTransform:
    """Inference preprocessing (resize, centre crop) as a PairTransform, for validation sets; normalised on the
    device like training batches."""

    processor: ImageProcessor

    def __call__(
        self, image: ImageSource, caption: str, rng: np.random.Generator
    ) -> tuple[torch.Tensor, str]:
        """Return (the image resized and cropped as uint8 [3, H, W], the caption); rng is not used."""
        return self.processor.uint8([image])[0], caption
