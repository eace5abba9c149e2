"""The ground truth of a shapes-world image: its objects, word or bar chart, and their vocabulary.

Captions, VQA answers, counts, spatial relations and presence (hallucination) probes are all read
from a `Scene`, never from pixels. Objects sit in the cells of a 3×3 grid (`GRID`) with a little
jitter, so positions ("top left") and relations ("to the left of") are unambiguous.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mmlm.data.synthetic.charts import BarChart
from mmlm.errors import InputError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 90, 245),
    "yellow": (245, 225, 30),
    "purple": (160, 60, 220),
    "orange": (255, 140, 0),
    "white": (245, 245, 245),
    "cyan": (30, 215, 225),
}
BACKGROUND = (24, 24, 24)  # the colour of every image's empty canvas
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "large")
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "cake", "door", "lamp", "milk",
    "rain", "ship", "sock", "frog", "kite", "leaf", "rock", "wolf", "bell", "corn", "duck", "goat",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
GRID = (0.18, 0.5, 0.82)  # cell centres as fractions of the image side; 0.32 apart
# A relation needs this much centre distance on its axis; objects in neighbouring cells are >= 0.28 apart.
RELATION_MARGIN = 0.15
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")


@dataclass(frozen=True)
class ShapeObject:
    """A filled shape; (x, y) is its centre as fractions of the image side, y growing downwards."""

    shape: str
    color: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class TextWord:
    """A word written in `color`, centred at (x, y) (fractions of the image side)."""

    word: str
    color: str
    x: float = 0.5
    y: float = 0.5


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: shapes, and optionally a written word or a bar chart."""

    objects: tuple[ShapeObject, ...] = ()
    word: TextWord | None = None
    chart: BarChart | None = None

    @property
    def kind(self) -> str:
        """Return "chart", "text" or "objects"."""
        return "chart" if self.chart is not None else "text" if self.word is not None else "objects"

    def count(self, shape: str | None = None, color: str | None = None, size: str | None = None) -> int:
        """Return how many objects match every attribute given."""
        return sum(
            (shape is None or o.shape == shape)
            and (color is None or o.color == color)
            and (size is None or o.size == size)
            for o in self.objects
        )

    def pairs(self) -> set[tuple[str, str]]:
        """Return the set of (colour, shape) pairs present."""
        return {(o.color, o.shape) for o in self.objects}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; `Scene.from_dict` reads it back."""
        data: dict[str, Any] = {"kind": self.kind, "objects": [asdict(o) for o in self.objects]}
        if self.word is not None:
            data["word"] = asdict(self.word)
        if self.chart is not None:
            data["chart"] = {"labels": list(self.chart.labels), "heights": list(self.chart.heights)}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scene":
        """Return the scene that `to_dict` wrote; raises InputError naming the bad field."""
        try:
            objects = tuple(ShapeObject(**o) for o in data.get("objects", ()))
            word = TextWord(**data["word"]) if data.get("word") else None
            bars = data.get("chart")
            chart = BarChart(tuple(bars["labels"]), tuple(bars["heights"])) if bars else None
        except (AttributeError, KeyError, TypeError) as error:
            raise InputError(
                f"scene: expected objects/word/chart as written by Scene.to_dict, got {data!r}"
            ) from error
        return cls(objects, word, chart)


def cell_of(obj: ShapeObject) -> tuple[int, int]:
    """Return the (row, column) of the 3×3 grid cell holding the object's centre."""
    row = min(range(3), key=lambda i: abs(obj.y - GRID[i]))
    column = min(range(3), key=lambda i: abs(obj.x - GRID[i]))
    return row, column


def position_name(obj: ShapeObject) -> str:
    """Return the object's place in words: "top left", "top", ..., "centre", ..., "bottom right"."""
    row, column = cell_of(obj)
    if row == 1:
        return COLUMNS[column]
    return ROWS[row] if column == 1 else f"{ROWS[row]} {COLUMNS[column]}"


def relation_holds(a: ShapeObject, relation: str, b: ShapeObject) -> bool:
    """Return whether `a <relation> b` is clearly true of the centres (by at least RELATION_MARGIN)."""
    gaps = {
        "to the left of": b.x - a.x,
        "to the right of": a.x - b.x,
        "above": b.y - a.y,
        "below": a.y - b.y,
    }
    return gaps[relation] >= RELATION_MARGIN


def relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """Return a relation that clearly holds for `a` relative to `b` (horizontal first), or None."""
    for name in RELATIONS:
        if relation_holds(a, name, b):
            return name
    return None
