"""The shapes world: determinism, held-out pairs, true captions, unique retrieval captions, files."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.charts import PLOT_BOTTOM, PLOT_TOP, bar_boxes
from mmlm.data.synthetic.shapes import (
    COLORS,
    SHAPES,
    BarChart,
    Scene,
    ShapeObject,
    TextWord,
    relation_holds,
)
from mmlm.errors import InputError

MIXED = {"objects": 0.6, "text": 0.2, "chart": 0.2}
COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES)
# Colour directly followed by shape is how every caption names an object ("two red crosses", "a small red cross").
PAIR_RE = re.compile(rf"\b({COLOR_RE}) ({SHAPE_RE})(?:e?s)?\b")
NOUN = rf"an? (?:(small|large) )?({COLOR_RE}) ({SHAPE_RE})"
RELATION_RE = re.compile(rf"^{NOUN} (to the left of|to the right of|above|below) {NOUN}$")
COUNT_RE = re.compile(rf"\b(two|three|four) ({COLOR_RE}) ({SHAPE_RE})e?s\b")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_same_seed_same_pixels_and_captions_different_seed_differs() -> None:
    first = list(shapes.generate(12, seed=7, kind_weights=MIXED))
    again = list(shapes.generate(12, seed=7, kind_weights=MIXED))
    other = list(shapes.generate(12, seed=8, kind_weights=MIXED))
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all(np.array_equal(_pixels(a.image), _pixels(b.image)) for a, b in zip(first, again, strict=True))
    assert [s.caption for s in first] != [s.caption for s in other]
    assert not all(
        np.array_equal(_pixels(a.image), _pixels(b.image)) for a, b in zip(first, other, strict=True)
    )


def test_stream_resumes_at_any_index() -> None:
    whole = list(shapes.generate(6, seed=3))
    tail = list(shapes.generate(2, seed=3, start=4))
    assert [s.caption for s in tail] == [s.caption for s in whole[4:]]
    assert shapes.make_sample(5, seed=3).scene == whole[5].scene


def test_eval_sets_are_deterministic() -> None:
    a, b = shapes.retrieval_set(20, seed=1), shapes.retrieval_set(20, seed=1)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert np.array_equal(_pixels(a[3].image), _pixels(b[3].image))
    z1, z2 = shapes.zero_shot_set(2, seed=1), shapes.zero_shot_set(2, seed=1)
    assert [s.scene for s in z1.samples] == [s.scene for s in z2.samples]


def test_split_keeps_every_colour_and_shape_in_train() -> None:
    train, heldout = shapes.split_combinations(seed=0, holdout_fraction=0.25)
    assert len(heldout) == 16 and len(train) == 48
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(shapes.all_pairs())
    assert {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(SHAPES)
    assert shapes.split_combinations(seed=0, holdout_fraction=0.25) == (train, heldout)
    assert shapes.split_combinations(seed=1, holdout_fraction=0.25)[1] != heldout
    # The largest split still leaves one pair per colour and per shape.
    train, _ = shapes.split_combinations(seed=2, holdout_fraction=56 / 64)
    assert {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(SHAPES)
    with pytest.raises(InputError, match="holdout_fraction"):
        shapes.split_combinations(seed=0, holdout_fraction=0.9)


def test_training_scenes_and_captions_never_contain_heldout_pairs() -> None:
    train, heldout = shapes.split_combinations(seed=0, holdout_fraction=0.25)
    named = 0
    for sample in shapes.generate(400, seed=0, pairs=train, kind_weights=MIXED):
        assert not sample.scene.pairs() & set(heldout)
        mentioned = set(PAIR_RE.findall(sample.caption))
        assert not mentioned & set(heldout), sample.caption
        if sample.scene.kind == "objects":
            assert mentioned and mentioned <= sample.scene.pairs(), sample.caption
            named += 1
    assert named > 200


def test_spatial_and_count_captions_are_true_of_the_scene() -> None:
    relations = counts = 0
    for sample in shapes.generate(600, seed=11):
        scene = sample.scene
        if match := RELATION_RE.match(sample.caption):
            size_a, color_a, shape_a, rel, size_b, color_b, shape_b = match.groups()
            (a,) = [
                o
                for o in scene.objects
                if (o.color, o.shape) == (color_a, shape_a) and size_a in (None, o.size)
            ]
            (b,) = [
                o
                for o in scene.objects
                if (o.color, o.shape) == (color_b, shape_b) and size_b in (None, o.size)
            ]
            assert relation_holds(a, rel, b), sample.caption
            relations += 1
        for number, color, shape in COUNT_RE.findall(sample.caption):
            assert scene.count(shape=shape, color=color) == ["two", "three", "four"].index(number) + 2
            counts += 1
    assert relations > 50 and counts > 20


def test_relation_needs_a_clear_margin() -> None:
    left = ShapeObject("circle", "red", "small", 0.18, 0.5)
    right = ShapeObject("square", "blue", "large", 0.82, 0.52)
    near = ShapeObject("star", "green", "small", 0.25, 0.5)
    assert shapes.relation(left, right) == "to the left of"
    assert shapes.relation(right, left) == "to the right of"
    assert shapes.relation(left, near) is None
    assert not relation_holds(left, "above", right)


def test_positions_in_complete_captions_match_coordinates() -> None:
    scene = Scene(
        (
            ShapeObject("circle", "orange", "large", 0.82, 0.83),
            ShapeObject("star", "red", "small", 0.17, 0.19),
        )
    )
    assert shapes.describe(scene) == (
        "a small red star in the top left and a large orange circle in the bottom right"
    )


def test_retrieval_captions_are_unique_and_complete() -> None:
    samples = shapes.retrieval_set(300, seed=0)
    captions = [s.caption for s in samples]
    assert len(set(captions)) == 300
    assert captions == [shapes.describe(s.scene) for s in samples]


def test_retrieval_set_redraws_collisions_until_the_space_is_exhausted() -> None:
    # One pair and one object: 2 sizes × 9 cells = 18 distinct captions exist, no more.
    samples = shapes.retrieval_set(18, seed=0, pairs=[("red", "circle")], max_objects=1)
    assert len({s.caption for s in samples}) == 18
    with pytest.raises(InputError, match="distinct"):
        shapes.retrieval_set(19, seed=0, pairs=[("red", "circle")], max_objects=1)


@pytest.mark.parametrize("image_size", [32, 64, 224])
def test_pixel_at_each_object_centre_has_its_colour(image_size: int) -> None:
    scenes = [s.scene for s in shapes.zero_shot_set(1, seed=0).samples]
    scenes += [s.scene for s in shapes.generate(30, seed=0)]
    for scene in scenes:
        pixels = _pixels(shapes.render(scene, image_size))
        assert pixels.shape == (image_size, image_size, 3)
        for o in scene.objects:
            centre = pixels[int(o.y * image_size), int(o.x * image_size)]
            assert tuple(centre) == COLORS[o.color], (o, image_size)


def test_zero_shot_set_labels_every_colour_shape_class() -> None:
    train, heldout = shapes.split_combinations(seed=0)
    zero_shot = shapes.zero_shot_set(3, heldout, seed=0)
    assert len(zero_shot.class_names) == 64 and "red circle" in zero_shot.class_names
    assert len(zero_shot.samples) == 3 * len(heldout) == len(zero_shot.labels)
    for sample, label in zip(zero_shot.samples, zero_shot.labels, strict=True):
        (obj,) = sample.scene.objects
        assert zero_shot.class_names[label] == f"{obj.color} {obj.shape}"
        assert (obj.color, obj.shape) in heldout


def test_written_word_draws_text_pixels() -> None:
    background = np.array(shapes.BACKGROUND)
    moon = _pixels(shapes.render(Scene(word=TextWord("moon", "white")), 64))
    inked = np.any(moon != background, axis=-1)
    assert inked.sum() > 40
    rows, columns = np.nonzero(inked)
    assert 16 < columns.mean() < 48 and 16 < rows.mean() < 48
    assert not np.array_equal(moon, _pixels(shapes.render(Scene(word=TextWord("frog", "white")), 64)))
    sample = shapes.make_sample(0, seed=0, kind_weights={"text": 1.0})
    assert sample.scene.kind == "text" and f'"{sample.scene.word.word}"' in sample.caption


def test_bar_chart_heights_are_ground_truth_and_drawn_to_scale() -> None:
    image_size = 64
    unit = (PLOT_BOTTOM - PLOT_TOP) * image_size / BarChart.MAX_HEIGHT
    for sample in shapes.generate(10, seed=5, kind_weights={"chart": 1.0}):
        chart = sample.scene.chart
        assert 3 <= len(chart.heights) <= 4 and len(set(chart.heights)) == len(chart.heights)
        assert all(1 <= h <= BarChart.MAX_HEIGHT for h in chart.heights)
        assert chart.height_of(chart.tallest()) == max(chart.heights)
        pixels = _pixels(shapes.render(sample.scene, image_size))
        for (x0, _, x1, _), label, height in zip(
            bar_boxes(chart, image_size), chart.labels, chart.heights, strict=True
        ):
            column = pixels[:, (x0 + x1) // 2]
            drawn = np.all(column == COLORS[label], axis=-1).sum()
            assert abs(drawn - height * unit) <= 1, (label, height, drawn)


def test_manifest_round_trip(tmp_path) -> None:
    manifest = shapes.write_dataset(tmp_path / "world", 12, seed=4, kind_weights=MIXED)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 12
    for index, record in enumerate(records):
        expected = shapes.make_sample(index, seed=4, kind_weights=MIXED)
        assert set(record) == {"image", "text", "scene"} and not record["image"].startswith("/")
        with Image.open(manifest.parent / record["image"]) as image:
            assert np.array_equal(_pixels(image.convert("RGB")), _pixels(expected.image))
        assert record["text"] == expected.caption
        assert Scene.from_dict(record["scene"]) == expected.scene
    plain = shapes.write_dataset(tmp_path / "plain", 2, seed=4, with_scene=False)
    assert set(json.loads(plain.read_text().splitlines()[0])) == {"image", "text"}


def test_bad_options_raise_input_error() -> None:
    with pytest.raises(InputError, match="kind_weights"):
        shapes.make_sample(0, seed=0, kind_weights={"video": 1.0})
    with pytest.raises(InputError, match="image_size"):
        shapes.make_sample(0, seed=0, image_size=8)
    with pytest.raises(InputError, match="pairs"):
        shapes.make_sample(0, seed=0, pairs=[("black", "circle")])
    with pytest.raises(InputError, match="scene"):
        Scene.from_dict({"objects": [{"shape": "circle"}]})
