"""The shapes world: a seeded generator of small images of coloured shapes, words and bar charts,
with templated captions and the ground-truth `Scene` (see `mmlm.data.synthetic.scene`) behind every image.

Colour×shape pairs can be held out of training (`split_combinations`) to measure compositional
zero-shot generalisation (`zero_shot_set`); `retrieval_set` gives captions that each describe
exactly one image of the set. Every function is deterministic given its seed.
"""

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmlm.data.synthetic.charts import (
    BarChart,
    caption_bar_chart,
    describe_bar_chart,
    draw_bar_chart,
    sample_bar_chart,
)
from mmlm.data.synthetic.colours import (
    COLOURLESS_VIEWS,
    UNNAMED_DISTANCE,
    drop_colour_words,
    greyscale,
    unnamed_palette,
)
from mmlm.data.synthetic.scene import (
    BACKGROUND,
    COLORS,
    GRID,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    ShapeObject,
    TextWord,
    cell_of,
    position_name,
    relation,
    relation_holds,
)
from mmlm.data.synthetic.world import World, as_world, sample_chart, split_bars, split_words
from mmlm.errors import InputError

__all__ = [
    "BACKGROUND", "COLORS", "UNNAMED_DISTANCE", "GRID", "KINDS", "RELATION_MARGIN", "RELATIONS", "SHAPES", "SIZES", "WORDS",
    "BarChart", "Sample", "Scene", "ShapeObject", "TextWord", "ZeroShotSet",
    "all_pairs", "caption", "cell_of", "colourless", "describe", "drop_colour_words", "generate", "greyscale", "make_sample", "position_name", "relation",
    "relation_holds", "render", "retrieval_set", "sample_scene", "single_object_scene", "split_combinations", "split_world", "unnamed_palette", "World",
    "write_dataset", "write_samples", "zero_shot_set",
]  # fmt: skip

KINDS: tuple[str, ...] = ("objects", "text", "chart")
SIZE_RADIUS = {"small": 0.09, "large": 0.14}  # fraction of the image side; GRID spacing 0.32 > 2 × 0.14
JITTER = 0.02
REPEAT_PROBABILITY = 0.3  # a further object copies the previous colour×shape, for counting captions
WORD_FONT_FRACTION = 0.25
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PLURALS = {"cross": "crosses"}
_STREAMS = {"train": 0, "zero_shot": 1, "retrieval": 2}


class Sample(NamedTuple):
    """One generated example: the rendered image, a caption and the scene behind both."""

    image: Image.Image
    caption: str
    scene: Scene


@dataclass(frozen=True)
class ZeroShotSet:
    """Single-object images with labels indexing `class_names` (every colour×shape pair, "red circle")."""

    class_names: tuple[str, ...]
    samples: list[Sample]
    labels: list[int]


# ---- rendering ----


def _regular(n: int, radius: float, start_deg: float = -90.0) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + 360.0 * i / n) for i in range(n)]
    return [(radius * math.cos(t), radius * math.sin(t)) for t in angles]


def _star() -> list[tuple[float, float]]:
    # Five points: outer and inner vertices alternate; shifted down 0.1 to centre its bounding box.
    radii = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
    return [(r * x, r * y + 0.1) for r, (x, y) in zip(radii, _regular(10, 1.0), strict=True)]


def _heart(n: int = 40) -> list[tuple[float, float]]:
    # The classic heart curve x = 16 sin³t, y = 13 cos t − 5 cos 2t − 2 cos 3t − cos 4t, scaled to [-1, 1]².
    ts = [2 * math.pi * i / n for i in range(n)]
    xs = [16 * math.sin(t) ** 3 for t in ts]
    ys = [-(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) for t in ts]
    y_mid, scale = (max(ys) + min(ys)) / 2, max(max(xs), (max(ys) - min(ys)) / 2)
    return [(x / scale, (y - y_mid) / scale) for x, y in zip(xs, ys, strict=True)]


# Unit outlines in [-1, 1]², y downwards; each contains its origin, so an object's centre pixel is filled.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.9), (0.95, 0.8), (-0.95, 0.8)],
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],
    "hexagon": _regular(6, 0.95, start_deg=0.0),
    "cross": [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3), (0.3, 0.9),
              (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)],
    "heart": _heart(),
}  # fmt: skip


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 embeds a scalable default font, so no font file is needed.
    return ImageFont.load_default(size=size)


def render(
    scene: Scene, image_size: int = 64, palette: dict[str, tuple[int, int, int]] | None = None
) -> Image.Image:
    """Return the scene drawn as an RGB image of image_size × image_size pixels, each colour name painted in
    `palette`'s colour for it (default: COLORS)."""
    palette = palette or COLORS
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * image_size, obj.y * image_size, SIZE_RADIUS[obj.size] * image_size
        fill = palette[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx + r * x, cy + r * y) for x, y in _OUTLINES[obj.shape]], fill=fill)
    if scene.word is not None:
        word = scene.word
        font = _font(max(6, round(WORD_FONT_FRACTION * image_size)))
        xy = (word.x * image_size, word.y * image_size)
        draw.text(xy, word.word, fill=palette[word.color], font=font, anchor="mm")
    if scene.chart is not None:
        draw_bar_chart(draw, scene.chart, image_size, palette)
    return image


# ---- sampling ----


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_scene(
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]] | World,
    kind: str = "objects",
    max_objects: int = 4,
) -> Scene:
    """Return a random scene of `kind` using only the given (colour, shape) pairs, or a World's pairs, words
    and chart bars."""
    world = as_world(pairs)
    if kind == "text":
        jitter = rng.uniform(-0.1, 0.1)
        word = _pick(rng, world.words)
        return Scene(word=TextWord(word, _pick(rng, list(COLORS)), 0.5, round(0.5 + jitter, 4)))
    if kind == "chart":
        every_bar = len(world.bars) == len(COLORS) * BarChart.MAX_HEIGHT  # the original stream, unchanged
        return Scene(
            chart=sample_bar_chart(rng, list(COLORS)) if every_bar else sample_chart(rng, world.bars)
        )
    pairs = world.pairs
    n = int(rng.integers(1, max_objects + 1))
    objects: list[ShapeObject] = []
    for cell in rng.choice(9, size=n, replace=False):
        if objects and rng.random() < REPEAT_PROBABILITY:
            color, shape = objects[-1].color, objects[-1].shape
        else:
            color, shape = _pick(rng, pairs)
        row, column = divmod(int(cell), 3)
        x, y = GRID[column] + rng.uniform(-JITTER, JITTER), GRID[row] + rng.uniform(-JITTER, JITTER)
        objects.append(ShapeObject(shape, color, _pick(rng, SIZES), round(x, 4), round(y, 4)))
    return Scene(tuple(objects))


def single_object_scene(rng: np.random.Generator, color: str, shape: str) -> Scene:
    """Return a scene of one `color` `shape` of random size in a random grid cell."""
    row, column = divmod(int(rng.integers(9)), 3)
    x, y = GRID[column] + rng.uniform(-JITTER, JITTER), GRID[row] + rng.uniform(-JITTER, JITTER)
    return Scene((ShapeObject(shape, color, _pick(rng, SIZES), round(x, 4), round(y, 4)),))


# ---- captions ----


def _position_phrase(obj: ShapeObject) -> str:
    name = position_name(obj)
    if name in ("top", "bottom"):
        return f"at the {name}"
    return f"on the {name}" if name in ("left", "right") else f"in the {name}"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _reading_order(objects: Iterable[ShapeObject]) -> list[ShapeObject]:
    return sorted(objects, key=cell_of)


def _count_phrase(objects: Sequence[ShapeObject]) -> str:
    groups = Counter((o.color, o.shape) for o in _reading_order(objects))
    return _join(
        [
            _with_article(f"{color} {shape}")
            if k == 1
            else f"{NUMBER_WORDS[k]} {color} {_PLURALS.get(shape, shape + 's')}"
            for (color, shape), k in groups.items()
        ]
    )


def describe(scene: Scene) -> str:
    """Return the canonical complete caption: every object with size, colour, shape and position."""
    if scene.chart is not None:
        return describe_bar_chart(scene.chart)
    if scene.word is not None:
        return f'the word "{scene.word.word}" written in {scene.word.color}'
    return _join(
        [
            _with_article(f"{o.size} {o.color} {o.shape} {_position_phrase(o)}")
            for o in _reading_order(scene.objects)
        ]
    )


def _relation_caption(scene: Scene, rng: np.random.Generator) -> str | None:
    objects = scene.objects
    exact = Counter((o.size, o.color, o.shape) for o in objects)
    loose = Counter((o.color, o.shape) for o in objects)
    nameable = [o for o in objects if exact[(o.size, o.color, o.shape)] == 1]
    candidates = [(a, b) for a in nameable for b in nameable if a is not b and relation(a, b)]
    if not candidates:
        return None
    a, b = _pick(rng, candidates)

    def refer(o: ShapeObject) -> str:
        with_size = loose[(o.color, o.shape)] > 1 or rng.random() < 0.5
        return _with_article(f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}")

    return f"{refer(a)} {relation(a, b)} {refer(b)}"


def colourless(
    scene: Scene, text: str, image_size: int, rng: np.random.Generator, view: str = "unnamed"
) -> tuple[Image.Image, str]:
    """Return a view of the scene that shows and names its shapes but not their colours, and its caption with the
    colour words dropped. `view` "unnamed" paints every colour name in a random colour that no word names
    (`unnamed_palette`), "greyscale" renders the scene in greyscale.

    Either way a shape is seen apart from the colours it has in training. The unnamed colours do more: a hexagon
    is then seen in many colours, so in these views its colour is no sign of its shape, and no held-out
    colour×shape pair is ever shown (every unnamed colour is far from every named one)."""
    if view not in COLOURLESS_VIEWS:
        raise InputError(f"colourless view: expected 'unnamed' or 'greyscale', got {view!r}")
    palette = unnamed_palette(rng) if view == "unnamed" else None
    image = render(scene, image_size, palette)
    return (image if palette else greyscale(image)), drop_colour_words(text)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Return one templated caption, picked with `rng`, that is true of `scene`."""
    if scene.chart is not None:
        return caption_bar_chart(scene.chart, rng)
    if scene.word is not None:
        word = scene.word
        return _pick(rng, (f'the word "{word.word}"', f'a sign that says "{word.word}"', describe(scene)))
    counted = _count_phrase(scene.objects)
    options = [describe(scene), counted, f"a photo of {counted}"]
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        options += [_with_article(f"{obj.size} {obj.color} {obj.shape}")] * 2
    related = _relation_caption(scene, rng)
    if related is not None:
        options += [related] * 2
    return _pick(rng, options)


# ---- splits and evaluation sets ----


def all_pairs() -> list[tuple[str, str]]:
    """Return every (colour, shape) pair in canonical order (colours outer, shapes inner)."""
    return [(color, shape) for color in COLORS for shape in SHAPES]


def split_combinations(
    seed: int, holdout_fraction: float = 0.25
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (train_pairs, heldout_pairs); every colour and every shape keeps a train pair."""
    n_colors, n_shapes = len(COLORS), len(SHAPES)
    n_heldout = round(holdout_fraction * n_colors * n_shapes)
    if not 0 <= n_heldout <= n_colors * n_shapes - max(n_colors, n_shapes):
        raise InputError(
            f"holdout_fraction: expected a fraction that leaves every colour and shape in training "
            f"(at most {1 - max(n_colors, n_shapes) / (n_colors * n_shapes):.3f}), got {holdout_fraction}"
        )
    rng = np.random.default_rng(seed)
    colors = [list(COLORS)[i] for i in rng.permutation(n_colors)]
    shapes = [SHAPES[i] for i in rng.permutation(n_shapes)]
    # Wrapped diagonals of the shuffled (square) colour×shape table: each diagonal holds every colour
    # and every shape once, so each loses at most ceil(n_heldout / 8) pairs and held-out pairs spread evenly.
    diagonals = [(colors[i], shapes[(i + d) % n_shapes]) for d in range(n_shapes) for i in range(n_colors)]
    heldout = set(diagonals[:n_heldout])
    train = [pair for pair in all_pairs() if pair not in heldout]
    return train, [pair for pair in all_pairs() if pair in heldout]


def split_world(seed: int, holdout_fraction: float = 0.25) -> tuple[World, World]:
    """Return (train, heldout) Worlds: `split_combinations`' pairs with `split_words` and `split_bars`."""
    train_pairs, heldout_pairs = split_combinations(seed, holdout_fraction)
    train_words, heldout_words = split_words(seed, holdout_fraction)
    train_bars, heldout_bars = split_bars(seed, holdout_fraction)
    return (World(tuple(train_pairs), train_words, train_bars),
            World(tuple(heldout_pairs), heldout_words, heldout_bars))  # fmt: skip


def zero_shot_set(
    n_per_class: int, pairs: Sequence[tuple[str, str]] | None = None, seed: int = 0, *, image_size: int = 64
) -> ZeroShotSet:
    """Return n_per_class single-object images for each pair, labelled among all colour×shape classes."""
    _check_options(pairs, image_size, None, 1)
    classes = all_pairs()
    rng = np.random.default_rng([seed, _STREAMS["zero_shot"]])
    samples, labels = [], []
    for color, shape in pairs if pairs is not None else classes:
        for _ in range(n_per_class):
            scene = single_object_scene(rng, color, shape)
            samples.append(Sample(render(scene, image_size), describe(scene), scene))
            labels.append(classes.index((color, shape)))
    return ZeroShotSet(tuple(f"{color} {shape}" for color, shape in classes), samples, labels)


def retrieval_set(
    n: int,
    seed: int = 0,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    image_size: int = 64,
    max_objects: int = 3,
) -> list[Sample]:
    """Return n object scenes whose complete captions (`describe`) are pairwise distinct."""
    _check_options(pairs, image_size, None, max_objects)
    rng = np.random.default_rng([seed, _STREAMS["retrieval"]])
    pairs = list(pairs) if pairs is not None else all_pairs()
    samples: list[Sample] = []
    seen: set[str] = set()
    draws = 0
    while len(samples) < n:
        if draws == 50 * n + 100:
            raise InputError(
                f"retrieval_set: found only {len(samples)} of n={n} distinct scenes; ask for fewer"
            )
        draws += 1
        scene = sample_scene(rng, pairs, "objects", max_objects)
        text = describe(scene)
        if text not in seen:  # a repeated caption would cap R@1, so draw again
            seen.add(text)
            samples.append(Sample(render(scene, image_size), text, scene))
    return samples


# ---- training stream and files ----


def make_sample(
    index: int,
    seed: int,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    image_size: int = 64,
    kind_weights: Mapping[str, float] | None = None,
    max_objects: int = 4,
) -> Sample:
    """Return training sample `index` of the stream `seed`; it depends on nothing else, so streams resume."""
    _check_options(pairs, image_size, kind_weights, max_objects)
    rng = np.random.default_rng([seed, _STREAMS["train"], index])
    weights = dict(kind_weights or {"objects": 1.0})
    kinds = list(weights)
    kind = kinds[int(rng.choice(len(kinds), p=np.array([weights[k] for k in kinds]) / sum(weights.values())))]
    scene = sample_scene(rng, pairs if pairs is not None else all_pairs(), kind, max_objects)
    return Sample(render(scene, image_size), caption(scene, rng), scene)


def generate(
    n: int,
    seed: int,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    image_size: int = 64,
    kind_weights: Mapping[str, float] | None = None,
    max_objects: int = 4,
    start: int = 0,
) -> Iterator[Sample]:
    """Yield training samples start, ..., start + n - 1 of the stream `seed` as (image, caption, scene)."""
    for index in range(start, start + n):
        yield make_sample(
            index,
            seed,
            pairs=pairs,
            image_size=image_size,
            kind_weights=kind_weights,
            max_objects=max_objects,
        )


def _check_options(
    pairs: Sequence[tuple[str, str]] | World | None,
    image_size: int,
    kind_weights: Mapping[str, float] | None,
    max_objects: int,
) -> None:
    pairs = None if pairs is None else as_world(pairs).pairs
    if pairs is not None and (not pairs or any(c not in COLORS or s not in SHAPES for c, s in pairs)):
        raise InputError(
            f"pairs: expected a non-empty list of (colour, shape) from {list(COLORS)} × {SHAPES}"
        )
    if not 16 <= image_size <= 1024:
        raise InputError(f"image_size: expected 16..1024 pixels, got {image_size}")
    if kind_weights is not None and (
        set(kind_weights) - set(KINDS)
        or any(w < 0 for w in kind_weights.values())
        or sum(kind_weights.values()) <= 0
    ):
        raise InputError(f"kind_weights: expected non-negative weights for {KINDS}, got {dict(kind_weights)}")
    if not 1 <= max_objects <= 9:
        raise InputError(f"max_objects: expected 1..9 (one object per grid cell), got {max_objects}")


def write_samples(
    out_dir: str | Path,
    samples: Iterable[Sample],
    *,
    with_scene: bool = True,
    manifest: str = "manifest.jsonl",
) -> Path:
    """Write samples as PNGs under out_dir/images and a JSONL manifest; return the manifest path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / manifest
    with manifest_path.open("w", encoding="utf-8") as lines:
        for i, sample in enumerate(samples):
            relative = f"images/{i:06d}.png"
            sample.image.save(out_dir / relative, format="PNG", compress_level=1)
            record: dict[str, Any] = {"image": relative, "text": sample.caption}
            if with_scene:
                record["scene"] = sample.scene.to_dict()
            lines.write(json.dumps(record) + "\n")
    return manifest_path


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    image_size: int = 64,
    kind_weights: Mapping[str, float] | None = None,
    max_objects: int = 4,
    with_scene: bool = True,
) -> Path:
    """Write n training samples of the stream `seed` to out_dir; return the manifest path."""
    samples = generate(
        n, seed, pairs=pairs, image_size=image_size, kind_weights=kind_weights, max_objects=max_objects
    )
    return write_samples(out_dir, samples, with_scene=with_scene)
