"""The CLIP demo's evaluation: validation and test sets are drawn apart, and zero-shot asks only about held-out pairs."""

import re

import numpy as np
import pytest
import torch

from mmlm.data.synthetic import shapes
from mmlm.errors import InputError
from mmlm.recipes import demo
from mmlm.train.config import DataConfig, load_train_config
from mmlm.train.run import shapes_pairs


class _Recorder:
    """Stands in for a ContrastiveModel and records the images and texts each evaluation asks it to encode."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.images: list[bytes] = []

    def class_embeddings(self, names, templates) -> torch.Tensor:
        return torch.eye(len(names))

    def encode_image(self, images, batch_size: int = 256) -> torch.Tensor:
        self.images += [im.tobytes() for im in images]
        return torch.nn.functional.one_hot(torch.arange(len(images)) % 64, 64).float()

    def encode_text(self, texts) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.arange(len(texts)) % 64, 64).float()


def test_validation_and_test_sets_share_no_image() -> None:
    val, _ = demo.shapes_evaluation(32, seed=0, validation=True, n_per_class=3, n_retrieval=40)
    test, n_heldout = demo.shapes_evaluation(32, seed=0, n_per_class=3, n_retrieval=40)
    on_val, on_test = _Recorder(), _Recorder()
    val(on_val, 0)
    test(on_test, 0)
    assert n_heldout == 16
    assert on_val.images and on_test.images
    assert not set(on_val.images) & set(on_test.images)


def test_training_captions_never_name_a_heldout_pair() -> None:
    _, heldout = shapes.split_combinations(0, holdout_fraction=0.25)
    captions = [text for _, text in shapes_pairs(DataConfig(shapes_samples=400), 32, seed=0)]
    named = [f"{color} {shape}" for color, shape in heldout]
    assert not [c for c in captions if any(n in c for n in named)]


def named_colour_distance(pixels: np.ndarray) -> np.ndarray:
    """Return each pixel's RGB distance to the nearest named colour."""
    named = np.array(list(shapes.COLORS.values()), dtype=np.float64)
    return np.linalg.norm(pixels.reshape(-1, 1, 3).astype(np.float64) - named, axis=2).min(1)


def test_unnamed_colourless_views_show_and_name_no_colour() -> None:
    pairs = shapes_pairs(DataConfig(shapes_samples=400, shapes_colourless_view="unnamed"), 32, seed=0)
    names_colour = [bool(set(text.split()) & set(shapes.COLORS)) for _, text in pairs]
    colourless = [pair for pair, named in zip(pairs, names_colour, strict=True) if not named]
    assert 0.2 < len(colourless) / len(pairs) < 0.4  # shapes_colourless = 0.3 of the scenes
    seen_colours = set()
    for image, text in colourless:
        pixels = np.asarray(image).reshape(-1, 3)
        shown = pixels[(pixels != shapes.BACKGROUND).any(1)]
        assert len(shown) and named_colour_distance(shown).min() >= shapes.UNNAMED_DISTANCE, text
        seen_colours |= set(map(tuple, shown))
        assert not re.search(r"\ban [^aeiou]", text), text
    assert len(seen_colours) > len(colourless)  # a fresh draw of unnamed colours for each view
    coloured = [np.asarray(image) for (image, _), named in zip(pairs, names_colour, strict=True) if named]
    assert all(named_colour_distance(p[(p != shapes.BACKGROUND).any(-1)]).max() == 0 for p in coloured)


def test_greyscale_colourless_views_are_the_default_and_grey() -> None:
    pairs = shapes_pairs(DataConfig(shapes_samples=200), 32, seed=0)
    grey = [image for image, text in pairs if not set(text.split()) & set(shapes.COLORS)]
    assert 0.2 < len(grey) / len(pairs) < 0.4
    assert all((np.asarray(im) == np.asarray(im)[..., :1]).all() for im in grey)
    with pytest.raises(InputError, match="colourless view: expected 'unnamed' or 'greyscale', got 'sepia'"):
        shapes_pairs(DataConfig(shapes_samples=50, shapes_colourless_view="sepia"), 32, seed=0)
    with pytest.raises(InputError, match="data.shapes_colourless_view: got 'sepia'; expected 'unnamed' or"):
        load_train_config(None, ["data.shapes_colourless_view=sepia"])  # a config names it before any data


def test_unnamed_palettes_are_far_from_every_named_colour_and_seeded() -> None:
    from mmlm.data.synthetic.charts import AXIS_COLOR, GRID_COLOR

    kept = np.array([*shapes.COLORS.values(), shapes.BACKGROUND, AXIS_COLOR, GRID_COLOR], dtype=np.float64)
    for seed in range(20):
        palette = shapes.unnamed_palette(np.random.default_rng(seed))
        assert set(palette) == set(shapes.COLORS)
        colours = np.array(list(palette.values()), dtype=np.float64)
        assert np.linalg.norm(colours[:, None] - kept, axis=2).min() >= shapes.UNNAMED_DISTANCE
    assert shapes.unnamed_palette(np.random.default_rng(3)) == shapes.unnamed_palette(
        np.random.default_rng(3)
    )


def test_colourless_drops_colour_words_and_fixes_articles() -> None:
    scene = shapes.Scene((shapes.ShapeObject("star", "orange", "large", 0.5, 0.2),))
    rng = np.random.default_rng(0)
    image, text = shapes.colourless(scene, "an orange star above two white circles", 32, rng)
    assert text == "a star above two circles"
    assert shapes.colourless(scene, shapes.describe(scene), 32, rng)[1] == "a large star at the top"
    star = np.asarray(image.getpixel((16, 6)), dtype=np.float64)  # the star's pixel, in an unnamed colour
    assert named_colour_distance(star).min() >= shapes.UNNAMED_DISTANCE
    grey, _ = shapes.colourless(scene, "", 32, rng, "greyscale")
    assert grey.mode == "RGB" and len(set(grey.getpixel((16, 6)))) == 1
    assert shapes.render(scene, 32).getpixel((16, 6)) == shapes.COLORS["orange"]
