"""The CLIP demo's evaluation: validation and test sets are drawn apart, and zero-shot asks only about held-out pairs."""

import re

import numpy as np
import torch

from mmlm.data.synthetic import shapes
from mmlm.recipes import demo
from mmlm.train.config import DataConfig
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


def test_colourless_views_show_and_name_no_colour() -> None:
    pairs = shapes_pairs(DataConfig(shapes_samples=400), 32, seed=0)
    names_colour = [bool(set(text.split()) & set(shapes.COLORS)) for _, text in pairs]
    colourless = [pair for pair, named in zip(pairs, names_colour, strict=True) if not named]
    assert 0.2 < len(colourless) / len(pairs) < 0.4  # shapes_colourless = 0.3 of the scenes
    for image, text in colourless:
        pixels = np.asarray(image)
        assert (pixels == pixels[..., :1]).all(), text  # greyscale: the three channels are equal
        assert not re.search(r"\ban [^aeiou]", text), text
    coloured = [np.asarray(image) for (image, _), named in zip(pairs, names_colour, strict=True) if named]
    assert sum(not (p == p[..., :1]).all() for p in coloured) > 0.9 * len(coloured)


def test_colourless_drops_colour_words_and_fixes_articles() -> None:
    scene = shapes.Scene((shapes.ShapeObject("star", "orange", "large", 0.5, 0.2),))
    image, text = shapes.colourless(shapes.render(scene, 32), "an orange star above two white circles")
    assert text == "a star above two circles"
    assert shapes.colourless(image, shapes.describe(scene))[1] == "a large star at the top"
    assert image.mode == "RGB" and len(set(image.getpixel((16, 6)))) == 1  # the star's pixel, grey
    assert shapes.render(scene, 32).getpixel((16, 6)) == shapes.COLORS["orange"]
