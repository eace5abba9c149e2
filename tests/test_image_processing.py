"""Image loading and preprocessing: parity with transformers' PIL processors, mode handling, bad files."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
from transformers.image_transforms import convert_to_rgb

from mmlm.errors import InputError
from mmlm.processing.image import ImageProcessor, load_image

HF_CLASSES = {"CLIPImageProcessor": CLIPImageProcessorPil, "SiglipImageProcessor": SiglipImageProcessorPil}


def _photos() -> list[Image.Image]:
    # Cropped so the short-edge resize floors a fractional long side and the crop margin is odd.
    return [
        Image.fromarray(data.astronaut()[:509, :397]),  # (h, w) 509x397 -> 287x224, crop margin 63
        Image.fromarray(data.coffee()),  # 400x600
        Image.fromarray(data.chelsea()),  # (h, w) 300x451 -> 224x336 (336.75 floored)
        Image.fromarray(data.camera()[:383, :511]),  # grayscale "L"
    ]


def _hf_pixels(processor: ImageProcessor, images: list[Image.Image]) -> torch.Tensor:
    hf = HF_CLASSES[processor.hf_type].from_dict(processor.to_hf())
    return hf(images, return_tensors="pt")["pixel_values"]


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, processor: ImageProcessor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    std = torch.tensor(processor.std).view(1, 3, 1, 1)
    grey_levels = ((ours - theirs) * std * 255).abs().max().item()  # un-normalised, in 0..255 units
    assert torch.equal(ours, theirs), f"differs from transformers by up to {grey_levels:.3g} grey levels"


PROCESSORS = {
    "clip224": ImageProcessor.clip(224),
    "clip336": ImageProcessor.clip(336),
    "clip64_crop56": ImageProcessor("shortest_edge", 64, (56, 56)),
    "clip32_crop40x48_pads": ImageProcessor("shortest_edge", 32, (40, 48)),  # crop larger than image
    "siglip224": ImageProcessor.siglip(224),
    "siglip384": ImageProcessor.siglip(384),
    "siglip32": ImageProcessor.siglip(32),
    "siglip48x64_bilinear": ImageProcessor(
        "exact", (48, 64), None, (0.5,) * 3, (0.5,) * 3, resample=2, hf_type="SiglipImageProcessor"
    ),
    "no_rescale_no_normalize": ImageProcessor("exact", 40, None, do_rescale=False, do_normalize=False),
}


@pytest.mark.parametrize("name", PROCESSORS)
def test_matches_transformers_on_photographs(name: str) -> None:
    processor, photos = PROCESSORS[name], _photos()
    _assert_same(processor(photos), _hf_pixels(processor, photos), processor)


def test_output_shapes_follow_resize_and_crop() -> None:
    chelsea = Image.fromarray(data.chelsea())  # 451 wide, 300 high
    assert ImageProcessor.clip(224).resized_size(300, 451) == (224, 336)
    assert ImageProcessor.clip(224).resized_size(451, 300) == (336, 224)
    assert ImageProcessor.clip(224)([chelsea, chelsea]).shape == (2, 3, 224, 224)
    assert ImageProcessor("exact", (48, 64), None)([chelsea]).shape == (1, 3, 48, 64)


# Checkpoint configs as the hub holds them: openai/clip-vit-base-patch32 (old ints),
# openai/clip-vit-large-patch14-336 and google/siglip-so400m-patch14-384.
CLIP_OLD = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}  # fmt: skip
CLIP_336 = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "CLIPProcessor",
            "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}  # fmt: skip
SIGLIP_384 = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
              "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
              "size": {"height": 384, "width": 384}}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "expected"),
    [(CLIP_OLD, ImageProcessor.clip(224)), (CLIP_336, ImageProcessor.clip(336)),
     (SIGLIP_384, ImageProcessor.siglip(384))],
)  # fmt: skip
def test_from_hf_reads_checkpoint_configs(config: dict, expected: ImageProcessor) -> None:
    assert ImageProcessor.from_hf(config) == expected
    hf = HF_CLASSES[expected.hf_type].from_dict(config)
    photos = _photos()[:2]
    _assert_same(expected(photos), hf(photos, return_tensors="pt")["pixel_values"], expected)


@pytest.mark.parametrize("name", PROCESSORS)
def test_to_hf_round_trips(name: str) -> None:
    processor = PROCESSORS[name]
    assert ImageProcessor.from_hf(processor.to_hf()) == processor


def test_from_hf_rejects_unsupported_configs() -> None:
    with pytest.raises(InputError, match="size"):
        ImageProcessor.from_hf({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 512}})
    with pytest.raises(InputError, match="image_processor_type"):
        ImageProcessor.from_hf({"image_processor_type": "Siglip2ImageProcessor"})
    with pytest.warns(UserWarning, match="crop_pct"):
        ImageProcessor.from_hf({**CLIP_336, "crop_pct": 0.9})


def _with_alpha(image: Image.Image) -> Image.Image:
    alpha = np.tile(np.linspace(0, 255, image.width).astype(np.uint8), (image.height, 1))
    image = image.copy()
    image.putalpha(Image.fromarray(alpha))
    return image


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    palette = image.quantize(16)
    palette.info["transparency"] = 3
    return palette


MODES = {
    "L": lambda rgb: rgb.convert("L"),
    "LA": lambda rgb: _with_alpha(rgb.convert("L")),
    "RGBA": _with_alpha,
    "P_transparency": _palette_with_transparency,
    "CMYK": lambda rgb: rgb.convert("CMYK"),
}


# PNG holds every mode but CMYK; JPEG holds L and CMYK.
MODE_CASES = [(mode, fmt) for mode in MODES for fmt in ("in_memory", "PNG")] + [
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
]
MODE_CASES.remove(("CMYK", "PNG"))


@pytest.mark.parametrize(("mode", "file_format"), MODE_CASES)
def test_modes_convert_to_rgb_as_transformers(mode: str, file_format: str, tmp_path) -> None:
    image = MODES[mode](Image.fromarray(data.chelsea()[100:164, 150:246]))
    if file_format != "in_memory":
        path = tmp_path / f"image.{file_format.lower()}"
        image.save(path, file_format)
        image, source = Image.open(path), path
    else:
        source = image
    assert image.mode == mode.split("_")[0]
    ours = load_image(source)
    assert ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), convert_to_rgb(image, return_numpy=True))
    processor = ImageProcessor.siglip(32)
    _assert_same(processor([source]), _hf_pixels(processor, [image]), processor)


def test_alpha_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(load_image(rgba)).min() == 255


def _sixteen_bit(gray: np.ndarray, mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    wide = (gray.astype(np.uint16) << 8) | rng.integers(0, 256, gray.shape, dtype=np.uint16)
    if mode == "I;16B":
        return Image.frombytes("I;16B", gray.shape[::-1], wide.astype(">u2").tobytes())
    return Image.fromarray(wide.astype(np.int32) if mode == "I" else wide)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_scales_to_its_eight_bit_counterpart(mode: str, tmp_path) -> None:
    gray = data.camera()[:100, :150]
    image = _sixteen_bit(gray, mode)
    assert image.mode == mode
    path = tmp_path / ("deep.tiff" if mode == "I" else "deep.png")  # Pillow writes "I" only as TIFF
    image.save(path)
    eight_bit = np.asarray(load_image(Image.fromarray(gray)))
    np.testing.assert_array_equal(np.asarray(load_image(image)), eight_bit)
    np.testing.assert_array_equal(np.asarray(load_image(path)), eight_bit)
    processor = ImageProcessor.clip(64)
    assert torch.equal(processor([image, path]), processor([Image.fromarray(gray)] * 2))


def test_sixteen_bit_transparent_key_becomes_white(tmp_path) -> None:
    values = np.array([[0, 1000], [40000, 65535]], np.uint16)
    path = tmp_path / "keyed.png"
    Image.fromarray(values).save(path, transparency=1000)
    np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], [[0, 255], [156, 255]])


def test_exif_orientation_is_applied(tmp_path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: red left half, blue right half
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    for source in (path, path.read_bytes(), Image.open(path)):
        upright = np.asarray(load_image(source))
        assert upright.shape == (40, 20, 3)
        assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 50  # red on top
        assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 50  # blue at the bottom


def _png_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG")
    return buffer.getvalue()


BAD_FILES = {
    "missing.jpg": (None, "not found"),
    "empty.jpg": (b"", "empty"),
    "notes.jpg": (b"a shopping list, not a photograph\n", "not a readable image"),
    "truncated.jpg": (_jpeg(data.astronaut())[:20_000], "truncated"),
    "bomb.png": (_png_declaring(100_000, 100_000), "decompression bomb"),
    "zero_height.png": (_png_declaring(8, 0), "not a readable image"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_input_error_naming_the_file(name: str, tmp_path) -> None:
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=reason) as error:
        load_image(path)
    assert name in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match=name):
        ImageProcessor.clip(32)([_photos()[0], str(path)])


def test_declared_size_is_checked_before_decoding(tmp_path) -> None:
    path = tmp_path / "large.png"
    path.write_bytes(_png_declaring(9_000, 9_000))  # no pixel data: decoding would report truncation
    with pytest.raises(
        InputError, match=r"large\.png: image declares 9000x9000 pixels, more than max_pixels"
    ):
        load_image(path, max_pixels=1_000_000)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(small)
    with pytest.raises(InputError, match=r"small\.png: .* more than max_pixels=1000"):
        ImageProcessor(max_pixels=1_000)([small])


def test_bad_in_memory_inputs_raise_input_error() -> None:
    with pytest.raises(InputError, match="<PIL image>: image is 0x8"):
        load_image(Image.new("RGB", (0, 8)))
    with pytest.raises(InputError, match="<bytes>: got 0 bytes"):
        load_image(b"")
    with pytest.raises(InputError, match="<bytes>: not a readable image"):
        load_image(b"GIF? no")
    with pytest.raises(InputError, match="empty list"):
        ImageProcessor.clip(32)([])
    with pytest.raises(InputError, match="differ"):
        ImageProcessor("exact", 32, None, do_resize=False)(_photos()[:2])


def test_fast_decode_keeps_geometry_and_stays_close(tmp_path) -> None:
    path = tmp_path / "astronaut.jpg"
    path.write_bytes(_jpeg(data.astronaut()))
    exact = ImageProcessor.clip(64)
    fast = ImageProcessor("shortest_edge", 64, (64, 64), fast_decode=True)
    reference, drafted = exact([path]), fast([path])
    grey_levels = (reference - drafted) * torch.tensor(exact.std).view(1, 3, 1, 1) * 255
    assert drafted.shape == reference.shape
    assert 0 < grey_levels.abs().mean() < 2  # draft changes pixels (hence opt-in) but only slightly
