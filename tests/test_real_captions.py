"""The real captioned sets: held-out regions and samples never reach training, captions follow the crop."""

import json

import numpy as np
import pytest
from PIL import Image

from mmlm.data.real_captions import build_photo_set, digit_image, digit_splits, photo_crop
from mmlm.errors import InputError


def test_a_crop_stays_inside_its_quadrant():
    # four solid quadrants: a crop that strayed over a border would hold two colours
    photo = np.zeros((200, 300, 3), np.uint8)
    photo[:100, :150], photo[:100, 150:], photo[100:, :150], photo[100:, 150:] = 40, 90, 160, 220
    image = Image.fromarray(photo)
    rng = np.random.default_rng(0)
    for _ in range(50):
        crop, caption = photo_crop(image, (150, 100, 300, 200), "a test", 32, rng)
        pixels = np.asarray(crop)
        assert pixels.min() == pixels.max()
        assert (
            caption.split(", ")[-1] in ("bottom right", "bottom", "right", "centre") and "a test" in caption
        )


def test_digit_splits_partition_the_samples():
    splits = digit_splits(1797, seed=3)
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(1797))
    assert [len(v) for v in splits.values()] == [1078, 359, 360]


def test_a_digit_caption_names_the_digit_and_its_ink():
    digit = np.zeros((8, 8))
    digit[1:7, 3:5] = 16
    image, caption = digit_image(digit, 7, 64, np.random.default_rng(1))
    ink = caption.split()[2]
    assert "handwritten seven" in caption and ink in ("black", "red", "blue", "green")
    assert image.size == (64, 64)


@pytest.mark.slow
def test_photo_set_writes_three_manifests(tmp_path):
    pytest.importorskip("skimage")
    built = build_photo_set(tmp_path, crops={"train": 2, "val": 1, "test": 1}, size=16)
    rows = [json.loads(line) for line in built.manifest("test").read_text().splitlines()]
    assert len(rows) == 23 and all((tmp_path / r["image"]).is_file() for r in rows)
    with pytest.raises(InputError):
        built.manifest("dev")
