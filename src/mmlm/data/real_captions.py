"""Small real image-caption sets built from data that packages ship: scikit-image's photographs, scikit-learn's digits.

Nothing is downloaded. Each builder writes PNG files and one JSONL manifest per split (`train.jsonl`,
`val.jsonl`, `test.jsonl`, the layout `mmlm train clip` reads as `data.source` and `val_data`), so a
from-scratch CLIP can be trained and scored on real pixels at CPU sizes.

Held out for real:
- photos: every photograph is cut into quadrants; one (chosen per photo) gives the test crops, another the
  validation crops, the other two the training crops, so no test pixel is ever in a training image;
- digits: the 1797 handwritten digits are split by sample, so no test digit is drawn in any training image.
Captions vary with the crop (zoom and position words for photos; size, ink colour and position for digits), so
many distinct pairs come from a few images.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from mmlm.errors import InputError

# skimage.data name -> what the photograph shows (only images that ship inside the package, no download)
PHOTOS = {
    "astronaut": "an astronaut in a white spacesuit",
    "brick": "a grey brick wall",
    "camera": "a man with a camera on a tripod",
    "chelsea": "a ginger cat",
    "checkerboard": "a black and white checkerboard",
    "clock": "a clock on a wall",
    "coffee": "a cup of coffee on a saucer",
    "coins": "old coins on a table",
    "colorwheel": "a colour wheel",
    "grass": "a patch of grass",
    "gravel": "a patch of gravel",
    "horse": "the silhouette of a horse",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained tissue under a microscope",
    "logo": "a snake logo",
    "moon": "the surface of the moon",
    "page": "a page of printed text",
    "retina": "the back of an eye",
    "rocket": "a rocket on a launch pad",
    "text": "letters painted on a sign",
    "cell": "a cell under a microscope",
    "binary_blobs": "white blobs on black",
    "shepp_logan_phantom": "a scan of a head phantom",
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INKS = {"black": (20, 20, 20), "red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 150, 50)}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RealCaptionSet:
    """Where a built set lives: one JSONL manifest per split."""

    root: Path

    def manifest(self, split: str) -> Path:
        """Return the JSONL manifest of `split` (train, val or test)."""
        if split not in SPLITS:
            raise InputError(f"split: got {split!r}; expected one of {', '.join(SPLITS)}")
        return self.root / f"{split}.jsonl"


def _rgb(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8:  # bool masks and float phantoms
        image = image.astype(np.float64)
        image = (255 * (image - image.min()) / max(1e-9, np.ptp(image))).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return Image.fromarray(image[:, :, :3])


def _position(cx: float, cy: float) -> str:
    """Return where a crop centre (fractions of the photo's width and height) lies, in words."""
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    return " ".join(w for w in (row, col) if w) or "centre"


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.75, 1.25)))
    return image


def _write(root: Path, split: str, rows: list[tuple[Image.Image, str]]) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    with (root / f"{split}.jsonl").open("w") as manifest:
        for i, (image, caption) in enumerate(rows):
            image.save(folder / f"{i:05d}.png")
            manifest.write(json.dumps({"image": f"{split}/{i:05d}.png", "text": caption}) + "\n")


def photo_crop(photo: Image.Image, region: tuple[int, int, int, int], subject: str, size: int,
               rng: np.random.Generator) -> tuple[Image.Image, str]:  # fmt: skip
    """Return a random crop inside `region` (left, top, right, bottom) of `photo`, resized, and its caption."""
    left, top, right, bottom = region
    side = int(rng.uniform(0.35, 1.0) * min(right - left, bottom - top))
    x = int(rng.integers(left, right - side + 1))
    y = int(rng.integers(top, bottom - side + 1))
    zoom = "a close-up of" if side * side < photo.width * photo.height / 12 else "part of"
    where = _position((x + side / 2) / photo.width, (y + side / 2) / photo.height)
    # crop before resizing: a resize with `box` filters over pixels beyond the box, which may be held out
    crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
    return _jitter(crop, rng), f"{zoom} {subject}, {where}"


def build_photo_set(root: str | Path, crops: dict[str, int] | None = None, size: int = 64,
                    seed: int = 0) -> RealCaptionSet:  # fmt: skip
    """Write crops of scikit-image's photographs with their captions, split by quadrant; return the set."""
    import skimage.data  # an optional dependency: only this builder needs it

    crops = crops or {"train": 160, "val": 8, "test": 8}  # per photograph
    rng = np.random.default_rng([seed, 11])
    rows: dict[str, list] = {split: [] for split in SPLITS}
    for name, subject in PHOTOS.items():
        photo = _rgb(getattr(skimage.data, name)())
        w, h = photo.width, photo.height
        quads = [
            (0, 0, w // 2, h // 2),
            (w // 2, 0, w, h // 2),
            (0, h // 2, w // 2, h),
            (w // 2, h // 2, w, h),
        ]
        order = rng.permutation(4)
        regions = {
            "test": [quads[order[0]]],
            "val": [quads[order[1]]],
            "train": [quads[i] for i in order[2:]],
        }
        for split, count in crops.items():
            for _ in range(count):
                region = regions[split][int(rng.integers(len(regions[split])))]
                rows[split].append(photo_crop(photo, region, subject, size, rng))
    root = Path(root)
    for split in SPLITS:
        order = rng.permutation(len(rows[split]))
        _write(root, split, [rows[split][i] for i in order])
    return RealCaptionSet(root)


def digit_image(
    digit: np.ndarray, value: int, size: int, rng: np.random.Generator
) -> tuple[Image.Image, str]:
    """Return an 8x8 digit (0-16 ink) drawn upsampled on a white canvas at a random place, size and ink; and its caption."""
    big = rng.random() < 0.5
    side = int(size * (0.6 if big else 0.35))
    ink_name = str(rng.choice(list(INKS)))
    mask = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BILINEAR
    )
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    canvas = Image.new("RGB", (size, size), (245, 245, 240))
    canvas.paste(Image.new("RGB", (side, side), INKS[ink_name]), (x, y), mask)
    where = _position((x + side / 2) / size, (y + side / 2) / size)
    return canvas, f"a {'large' if big else 'small'} {ink_name} handwritten {DIGIT_WORDS[value]}, {where}"


def digit_splits(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Return split -> sample indices: a seeded 60/20/20 partition of `count` samples."""
    order = np.random.default_rng([seed, 17]).permutation(count)
    cut = [int(0.6 * count), int(0.8 * count)]
    return {"train": order[: cut[0]], "val": order[cut[0] : cut[1]], "test": order[cut[1] :]}


def build_digit_set(root: str | Path, copies: int = 2, size: int = 64, seed: int = 0) -> RealCaptionSet:
    """Write scikit-learn's handwritten digits, split 60/20/20 by sample (each training digit drawn `copies` times)."""
    from sklearn.datasets import load_digits  # an optional dependency: only this builder needs it

    digits = load_digits()
    rng = np.random.default_rng([seed, 13])
    root = Path(root)
    for split, indices in digit_splits(len(digits.images), seed).items():
        repeat = copies if split == "train" else 1
        rows = [
            digit_image(digits.images[i], int(digits.target[i]), size, rng)
            for _ in range(repeat)
            for i in indices
        ]
        _write(root, split, [rows[i] for i in rng.permutation(len(rows))])
    return RealCaptionSet(root)
