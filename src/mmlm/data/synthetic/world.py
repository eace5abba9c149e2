"""What a split of the shapes world may show: its colour×shape pairs, its words and its chart bars.

An honest held-out test asks about things no training sample contained: colour×shape pairs
(`shapes.split_combinations`), written words (`split_words`) and chart bars, as (colour, height) pairs
(`split_bars`). A `World` carries one side of such a split; the scene sampler draws only from it, so the
train side feeds every training sample (tower pre-training, the LM's text corpus, instruction data and the
tokenizer's text) and the held-out side the test. Every split is deterministic in its seed.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mmlm.data.synthetic.charts import BarChart
from mmlm.data.synthetic.scene import COLORS, WORDS

HEIGHTS: tuple[int, ...] = tuple(range(1, BarChart.MAX_HEIGHT + 1))
_WORD_STREAM, _BAR_STREAM = 21, 22  # apart from split_combinations' stream (the bare seed)


@dataclass(frozen=True)
class World:
    """The colour×shape pairs, words and (colour, height) chart bars that a split's scenes may use."""

    pairs: tuple[tuple[str, str], ...]
    words: tuple[str, ...] = WORDS
    bars: tuple[tuple[str, int], ...] = field(
        default_factory=lambda: tuple((c, h) for c in COLORS for h in HEIGHTS)
    )


def as_world(pairs: "Sequence[tuple[str, str]] | World") -> World:
    """Return `pairs` as a World: a plain list of pairs allows every word and every chart bar."""
    return pairs if isinstance(pairs, World) else World(tuple(pairs))


def split_words(seed: int, holdout_fraction: float = 0.25) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (train_words, heldout_words): a seeded draw of round(fraction × 24) words held out."""
    order = np.random.default_rng([seed, _WORD_STREAM]).permutation(len(WORDS))
    heldout = {WORDS[i] for i in order[: round(holdout_fraction * len(WORDS))]}
    return tuple(w for w in WORDS if w not in heldout), tuple(w for w in WORDS if w in heldout)


def split_bars(
    seed: int, holdout_fraction: float = 0.25
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    """Return (train_bars, heldout_bars) of (colour, height) pairs; every colour and height keeps both sides.

    As `split_combinations`: wrapped diagonals of the shuffled colour×height table, so held-out bars spread
    evenly over colours and heights and a chart of distinct colours and heights can be drawn from each side.
    """
    rng = np.random.default_rng([seed, _BAR_STREAM])
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    heights = [HEIGHTS[i] for i in rng.permutation(len(HEIGHTS))]
    n_heldout = round(holdout_fraction * len(colors) * len(heights))
    diagonals = [
        (colors[i], heights[(i + d) % len(heights)]) for d in range(len(heights)) for i in range(len(colors))
    ]
    heldout = set(diagonals[:n_heldout])
    every = [(c, h) for c in COLORS for h in HEIGHTS]
    return tuple(b for b in every if b not in heldout), tuple(b for b in every if b in heldout)


def sample_chart(rng: np.random.Generator, bars: Sequence[tuple[str, int]]) -> BarChart:
    """Return a chart of 3-4 bars of distinct colours and distinct heights, each an allowed (colour, height)."""
    while True:  # a draw that paints itself into a corner starts again; a few tries suffice
        n_bars = int(rng.integers(3, 5))
        labels, heights = [], []
        for color in [list(COLORS)[i] for i in rng.permutation(len(COLORS))]:
            options = [h for c, h in bars if c == color and h not in heights]
            if options:
                labels.append(color)
                heights.append(int(options[int(rng.integers(len(options)))]))
            if len(labels) == n_bars:
                return BarChart(tuple(labels), tuple(heights))
