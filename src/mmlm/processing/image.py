"""Image loading and CLIP/SigLIP preprocessing, matching transformers' PIL-backed image processors.

`load_image` is the boundary: it turns a path, encoded bytes or a PIL image into an upright 8-bit RGB image,
or raises `InputError`. `ImageProcessor` then resizes (PIL, on uint8), centre-crops and normalises a batch
into the float32 [B, 3, H, W] tensor a vision tower takes, with the same numbers as transformers'
`CLIPImageProcessorPil` / `SiglipImageProcessorPil` (and `ChameleonImageProcessorPil`, the same steps).

Deliberate deviation from transformers: 16-bit grayscale ("I;16", "I;16B", "I") is scaled to 8 bits
(value >> 8); transformers' `convert_to_rgb` lets PIL clip every value above 255 to white.
"""

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from mmlm.errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
MAX_PIXELS = 178_956_970  # PIL's DecompressionBombError level, 2 * Image.MAX_IMAGE_PIXELS

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillow opens 16-bit PNGs
# LLaVA-NeXT's processes each tile as CLIP's does (its tiling: mmlm.processing.anyres.DynamicResolution.from_hf)
_HF_TYPES = (
    "CLIPImageProcessor",
    "SiglipImageProcessor",
    "LlavaNextImageProcessor",
    "ChameleonImageProcessor",
    "BlipImageProcessor",
)
_HF_KEYS = {
    "image_processor_type", "feature_extractor_type", "processor_class", "do_convert_rgb", "do_resize", "size",
    "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
    "image_std", "image_grid_pinpoints", "do_pad",
}  # fmt: skip


def load_image(
    source: ImageSource, max_pixels: int = MAX_PIXELS, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Return `source` (a path, encoded bytes or a PIL image) as an upright RGB PIL image.

    `draft_size` (width, height) lets a JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that big.
    """
    if isinstance(source, Image.Image):
        _check_size("<PIL image>", source.size, max_pixels)
        image = source
    elif isinstance(source, bytes | bytearray):
        if not source:
            raise InputError("<bytes>: got 0 bytes; expected an encoded image (JPEG, PNG, ...)")
        image = _decode(io.BytesIO(source), "<bytes>", max_pixels, draft_size)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: file not found; expected an image file")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes); expected an image file")
        with path.open("rb") as stream:
            image = _decode(stream, str(path), max_pixels, draft_size)
    return _to_rgb(_upright(image))


def _check_size(name: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width == 0 or height == 0:
        raise InputError(f"{name}: image is {width}x{height}; expected a non-zero width and height")
    if width * height > max_pixels:
        raise InputError(
            f"{name}: image declares {width}x{height} pixels, more than max_pixels={max_pixels}; "
            "expected a smaller image (possible decompression bomb)"
        )


def _decode(stream: io.IOBase, name: str, max_pixels: int, draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        image = Image.open(stream)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"{name}: {error}; expected an image of at most {max_pixels} pixels") from error
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's plugins raise all three on damaged headers
        raise InputError(f"{name}: not a readable image; expected an image file (JPEG, PNG, ...)") from error
    _check_size(name, image.size, max_pixels)  # before any pixel is decoded
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", draft_size)
    try:
        image.load()  # a full decode here, so truncation surfaces now rather than inside a model
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{name}: {error}; expected a complete, uncorrupted image file") from error
    return image


def _upright(image: Image.Image) -> Image.Image:
    # transformers' load_image applies the EXIF orientation too; skip the copy when there is none
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        transparent = image.info.get("transparency")
        if transparent is not None:
            gray[values == transparent] = 255  # a tRNS key colour composited onto white
        return Image.fromarray(gray).convert("RGB")
    # transformers.image_transforms.convert_to_rgb: alpha is composited onto white
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    # transformers.image_transforms.center_crop: an image smaller than the crop is first zero-padded,
    # centred with ceil offsets; the crop's top-left corner is floor((size - crop) / 2).
    old_height, old_width = pixels.shape[:2]
    if height > old_height or width > old_width:
        padded = np.zeros((max(height, old_height), max(width, old_width), 3), np.uint8)
        top, left = -(-(padded.shape[0] - old_height) // 2), -(-(padded.shape[1] - old_width) // 2)
        padded[top : top + old_height, left : left + old_width] = pixels
        pixels = padded
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    return pixels[top : top + height, left : left + width]


def _height_width(value: Any, field: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Mapping) and {"height", "width"} <= value.keys():
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, Sequence) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise InputError(f"{field}: got {value!r}; expected an int, [height, width] or {{'height', 'width'}}")


def _three(value: Any) -> tuple[float, float, float]:
    return (float(value),) * 3 if isinstance(value, int | float) else tuple(float(v) for v in value)


@dataclass
class ImageProcessor:
    """Resize, centre-crop and normalise images the way a CLIP or SigLIP checkpoint expects."""

    resize_mode: Literal["shortest_edge", "exact"] = "shortest_edge"
    size: int | tuple[int, int] = 224  # shortest_edge: the short side's length; exact: (height, width)
    crop_size: tuple[int, int] | None = (224, 224)  # (height, width); None: no centre crop
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BICUBIC
    hf_type: str = "CLIPImageProcessor"  # image_processor_type written by to_hf
    max_pixels: int = MAX_PIXELS
    # JPEG DCT-domain downscaling (Image.draft) is several times faster on large photos, but its pixels differ
    # from a full decode followed by a bicubic resize, which breaks parity with transformers: opt-in only.
    fast_decode: bool = False

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest_edge", "exact"):
            raise InputError(f"resize_mode: got {self.resize_mode!r}; expected 'shortest_edge' or 'exact'")
        if self.resize_mode == "shortest_edge" and not isinstance(self.size, int):
            raise InputError(f"size: got {self.size!r}; expected an int with resize_mode='shortest_edge'")
        if self.resize_mode == "exact":
            self.size = _height_width(self.size, "size")
        if self.crop_size is not None:
            self.crop_size = _height_width(self.crop_size, "crop_size")
        self.mean, self.std = _three(self.mean), _three(self.std)

    @classmethod
    def clip(cls, image_size: int) -> "ImageProcessor":
        """Return OpenAI CLIP's preprocessing: short side to `image_size`, centre crop, CLIP mean/std."""
        return cls("shortest_edge", image_size, (image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @classmethod
    def siglip(cls, image_size: int) -> "ImageProcessor":
        """Return SigLIP's preprocessing: squash to `image_size` square, no crop, mean/std 0.5."""
        return cls("exact", image_size, None, SIGLIP_MEAN, SIGLIP_STD, hf_type="SiglipImageProcessor")

    @classmethod
    def chameleon(cls, image_size: int) -> "ImageProcessor":
        """Return Chameleon's preprocessing: short side to `image_size` (Lanczos), centre crop, x·0.0078 − 1."""
        return cls("shortest_edge", image_size, (image_size, image_size), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0),
                   rescale_factor=0.0078, resample=Image.Resampling.LANCZOS,
                   hf_type="ChameleonImageProcessor")  # fmt: skip

    @classmethod
    def blip(cls, image_size: int) -> "ImageProcessor":
        """Return BLIP / BLIP-2's preprocessing: squash to `image_size` square (bicubic), no crop, CLIP mean/std."""
        return cls("exact", image_size, None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, hf_type="BlipImageProcessor")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ImageProcessor":
        """Return the processor a transformers preprocessor_config.json dict (CLIP or SigLIP) describes."""
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or _HF_TYPES[0])
        kind = kind.removesuffix("Pil").removesuffix("Fast").replace("FeatureExtractor", "ImageProcessor")
        if kind not in _HF_TYPES:
            raise InputError(f"image_processor_type: got {kind!r}; expected one of {_HF_TYPES}")
        if unknown := sorted(set(config) - _HF_KEYS):
            warnings.warn(f"preprocessor config: ignoring unknown keys {unknown}", stacklevel=2)
        bases = {"SiglipImageProcessor": cls.siglip(224), "ChameleonImageProcessor": cls.chameleon(512),
                 "BlipImageProcessor": cls.blip(384)}  # fmt: skip
        base = bases.get(kind, cls.clip(224))
        size = config.get("size")
        if size is None:
            resize_mode, size = base.resize_mode, base.size
        elif isinstance(size, int) or (isinstance(size, Mapping) and set(size) == {"shortest_edge"}):
            # transformers 5 reads an int size as the shortest edge for both CLIP and SigLIP
            resize_mode, size = "shortest_edge", int(size if isinstance(size, int) else size["shortest_edge"])
        else:
            resize_mode, size = "exact", _height_width(size, "size")
        crop = None
        if config.get("do_center_crop", base.crop_size is not None):
            crop = _height_width(config.get("crop_size", base.crop_size), "crop_size")
        return cls(
            resize_mode=resize_mode,
            size=size,
            crop_size=crop,
            mean=_three(config.get("image_mean", base.mean)),
            std=_three(config.get("image_std", base.std)),
            rescale_factor=float(config.get("rescale_factor", base.rescale_factor)),
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            do_normalize=bool(config.get("do_normalize", True)),
            resample=int(config.get("resample", base.resample)),
            hf_type=kind,
        )

    def to_hf(self) -> dict[str, Any]:
        """Return this processor as a preprocessor_config.json dict that transformers loads."""
        size = self.size
        config = {
            "image_processor_type": self.hf_type,
            "do_convert_rgb": True,
            "do_resize": self.do_resize,
            "size": {"shortest_edge": size}
            if isinstance(size, int)
            else {"height": size[0], "width": size[1]},
            "resample": int(self.resample),
            "do_center_crop": self.crop_size is not None,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        if self.crop_size is not None:
            config["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return config

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) an image of this size is resized to."""
        if not self.do_resize:
            return (height, width)
        if isinstance(self.size, tuple):
            return self.size
        # transformers' get_resize_output_image_size (torchvision's rule): the long side is floored, not rounded
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def value_table(self) -> np.ndarray:
        """Return the [3, 256] float32 output value of each uint8 level in each channel."""
        levels = np.arange(256, dtype=np.float64)
        # transformers rescales in float64 and casts to float32, then normalises in float32; a table of those
        # 256 values per channel gives the same bits for a fraction of the arithmetic.
        values = (levels * self.rescale_factor if self.do_rescale else levels).astype(np.float32)
        values = np.broadcast_to(values, (3, 256))
        if self.do_normalize:
            mean = np.asarray(self.mean, np.float32)[:, None]
            values = (values - mean) / np.asarray(self.std, np.float32)[:, None]
        return np.ascontiguousarray(values, dtype=np.float32)

    def pixels(self, image: ImageSource) -> np.ndarray:
        """Return one image loaded, resized and centre-cropped as uint8 [H, W, 3]."""
        draft = None
        if self.fast_decode:
            side = 2 * max(self.size if isinstance(self.size, tuple) else (self.size,))  # bicubic still 2x
            draft = (side, side)  # square, so it holds whatever the EXIF orientation
        image = load_image(image, self.max_pixels, draft)
        height, width = self.resized_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        return pixels if self.crop_size is None else _center_crop(pixels, *self.crop_size)

    def _batch(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        if len(images) == 0:
            raise InputError("images: got an empty list; expected at least one image")
        batch = [self.pixels(image) for image in images]
        if len(shapes := {pixels.shape for pixels in batch}) > 1:
            raise InputError(
                f"images: sizes {sorted(shapes)} differ; expected one size (set size or crop_size)"
            )
        return batch

    def uint8(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Return `images` resized and cropped, not yet normalised, as a uint8 tensor [B, 3, H, W].

        Training batches travel in this form (a quarter of float32's bytes through loader workers, pinned
        memory and the copy to the device); `PixelNormalize` then gives the model the numbers __call__ gives.
        """
        batch = self._batch(images)
        return torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).copy())  # [B, H, W, 3] -> [B, 3, H, W]

    def __call__(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Return `images` preprocessed as a float32 tensor [B, 3, H, W]."""
        batch = self._batch(images)
        table, channels = self.value_table(), np.arange(3)[:, None, None]
        out = np.empty((len(batch), 3, *batch[0].shape[:2]), np.float32)
        for i, pixels in enumerate(batch):
            out[i] = table[channels, pixels.transpose(2, 0, 1)]  # [H, W, 3] uint8 -> [3, H, W] float32
        return torch.from_numpy(out)


class PixelNormalize(torch.nn.Module):
    """Rescales and normalises uint8 pixels [..., 3, H, W] where they are: on the GPU, after the copy.

    Training data stays uint8 until the device (`ImageProcessor.uint8`, `mmlm.data.augment.TrainTransform`),
    so workers, pinned memory and the host-to-device copy move a quarter of float32's bytes. The arithmetic is
    the value table's in float32, (x / (1/rescale_factor) − mean) / std: for the usual rescale_factor 1/255
    the same bits as `ImageProcessor.value_table`, for others within one float32 rounding (about 1e-7).
    """

    def __init__(self, processor: ImageProcessor) -> None:
        super().__init__()
        self.divisor = 1 / processor.rescale_factor if processor.do_rescale else 1.0
        mean, std = (processor.mean, processor.std) if processor.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None], persistent=False)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return uint8 pixels [..., 3, H, W] as the model's input in `dtype`; float pixels pass unchanged."""
        if pixels.dtype != torch.uint8:
            return pixels
        return ((pixels.float() / self.divisor - self.mean) / self.std).to(dtype)
