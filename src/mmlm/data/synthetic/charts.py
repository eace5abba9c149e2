"""Tiny bar charts for the shapes world: 3-4 coloured bars with integer heights, drawn with a unit grid.

The colour names are the category labels, so a chart can be asked about in words ("How tall is the
red bar?") and its answers come from `BarChart.heights`, not from reading pixels.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import ImageDraw

AXIS_COLOR = (150, 150, 150)
GRID_COLOR = (56, 56, 56)
# Plot area as fractions of the image side; the left and bottom margins hold the axes.
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 0.14, 0.94, 0.08, 0.88


@dataclass(frozen=True)
class BarChart:
    """A bar chart whose bar i has category (colour) `labels[i]` and integer height `heights[i]`."""

    labels: tuple[str, ...]
    heights: tuple[int, ...]

    MAX_HEIGHT: ClassVar[int] = 9

    def height_of(self, label: str) -> int:
        """Return the height of the bar labelled `label`."""
        return self.heights[self.labels.index(label)]

    def tallest(self) -> str:
        """Return the label of the tallest bar (heights are distinct, so it is unique)."""
        return self.labels[int(np.argmax(self.heights))]

    def shortest(self) -> str:
        """Return the label of the shortest bar."""
        return self.labels[int(np.argmin(self.heights))]


def sample_bar_chart(rng: np.random.Generator, colors: Sequence[str]) -> BarChart:
    """Return a chart of 3-4 bars with distinct colours and distinct heights in 1..MAX_HEIGHT."""
    n_bars = int(rng.integers(3, 5))
    labels = [colors[i] for i in rng.choice(len(colors), size=n_bars, replace=False)]
    heights = [int(h) for h in rng.choice(np.arange(1, BarChart.MAX_HEIGHT + 1), size=n_bars, replace=False)]
    return BarChart(tuple(labels), tuple(heights))


def bar_boxes(chart: BarChart, image_size: int) -> list[tuple[int, int, int, int]]:
    """Return each bar's pixel box (x0, y0, x1, y1), inclusive, in bar order."""
    left, right = PLOT_LEFT * image_size, PLOT_RIGHT * image_size
    base = round(PLOT_BOTTOM * image_size)
    unit = (PLOT_BOTTOM - PLOT_TOP) * image_size / BarChart.MAX_HEIGHT
    slot = (right - left) / len(chart.heights)
    boxes = []
    for i, height in enumerate(chart.heights):
        x0 = round(left + (i + 0.2) * slot)
        x1 = round(left + (i + 0.8) * slot) - 1
        boxes.append((x0, base - round(height * unit), x1, base - 1))
    return boxes


def draw_bar_chart(
    draw: ImageDraw.ImageDraw, chart: BarChart, image_size: int, palette: Mapping[str, tuple[int, int, int]]
) -> None:
    """Draw `chart` (grid, axes, bars) onto `draw`; returns nothing."""
    left, right = round(PLOT_LEFT * image_size), round(PLOT_RIGHT * image_size)
    base = round(PLOT_BOTTOM * image_size)
    unit = (PLOT_BOTTOM - PLOT_TOP) * image_size / BarChart.MAX_HEIGHT
    tick = max(1, image_size // 32)
    for level in range(1, BarChart.MAX_HEIGHT + 1):
        y = base - round(level * unit)
        draw.line([(left, y), (right, y)], fill=GRID_COLOR)
        draw.line([(left - tick, y), (left - 1, y)], fill=AXIS_COLOR)
    for box, label in zip(bar_boxes(chart, image_size), chart.labels, strict=True):
        draw.rectangle(box, fill=palette[label])
    draw.line([(left - 1, base), (right, base)], fill=AXIS_COLOR)
    draw.line([(left - 1, round(PLOT_TOP * image_size)), (left - 1, base)], fill=AXIS_COLOR)


def describe_bar_chart(chart: BarChart) -> str:
    """Return the complete caption of `chart`: every bar's colour and height, in order."""
    values = [f"{label} {height}" for label, height in zip(chart.labels, chart.heights, strict=True)]
    return f"a bar chart with {len(values)} bars: " + ", ".join(values[:-1]) + " and " + values[-1]


def caption_bar_chart(chart: BarChart, rng: np.random.Generator) -> str:
    """Return one templated caption that is true of `chart`."""
    templates = (
        describe_bar_chart(chart),
        f"a bar chart in which the {chart.tallest()} bar is the tallest",
        f"a bar chart in which the {chart.shortest()} bar is the shortest",
    )
    return templates[int(rng.integers(len(templates)))]
