"""Dynamic resolution (LLaVA-NeXT "anyres"): cut a large image into encoder-sized tiles plus a global view.

From a list of candidate resolutions (multiples of the tile size), `select_best_resolution` picks the one
that keeps the most of the image's pixels and, among those, wastes the least padding. The image is resized
to fit it with its aspect ratio kept, padded to it with black, centred, and cut into rows×cols tiles in
row-major order; the whole image squashed to one tile comes first as the global view. This matches
transformers' LlavaNextImageProcessorPil pixel for pixel.

Deliberate deviation from LLaVA-NeXT's model side: every tile, global view included, gives the connector's
full token count (no un-padding and no newline token per row), so an image costs (1 + rows·cols) × tile tokens.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mmlm.errors import InputError


def select_best_resolution(size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Return the (height, width) in `resolutions` that keeps most of an image of `size` (height, width).

    Effective resolution = pixels of the image after scaling it to fit (never more than the original has);
    ties go to the candidate with the least wasted (padded) area.
    """
    height, width = size
    best, best_effective, best_wasted = None, 0, math.inf
    for res_height, res_width in resolutions:
        scale = min(res_width / width, res_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = res_width * res_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (res_height, res_width), effective, wasted
    if best is None:
        raise InputError(
            f"resolutions: got {list(resolutions)}; expected at least one positive (height, width)"
        )
    return best


def tile_resolutions(tile_size: int, max_tiles: int) -> list[tuple[int, int]]:
    """Return every (rows·tile_size, cols·tile_size) with rows·cols <= max_tiles, by rows then cols."""
    if max_tiles < 1:
        raise InputError(f"max_tiles: got {max_tiles}; expected at least 1")
    return [
        (rows * tile_size, cols * tile_size)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles // rows + 1)
    ]


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Return the (height, width) an image of `size` is resized to so it fits `target`, aspect ratio kept."""
    (height, width), (target_height, target_width) = size, target
    # transformers' get_patch_output_size: the fitted side is exact, the other rounds up
    if target_width / width < target_height / height:
        return min(math.ceil(height * (target_width / width)), target_height), target_width
    return target_height, min(math.ceil(width * (target_height / height)), target_width)


@dataclass(frozen=True)
class TiledImage:
    """An image cut for the encoder: the global view then rows×cols tiles, each tile_size square."""

    tiles: list[Image.Image]
    grid: tuple[int, int]  # (rows, cols) of the tiled part
    size: tuple[int, int]  # the original (height, width)


@dataclass
class DynamicResolution:
    """LLaVA-NeXT tiling: choose a grid from `resolutions`, tile the image, add a downscaled global view."""

    tile_size: int
    resolutions: Sequence[tuple[int, int]] = ()  # (height, width) multiples of tile_size; () means max_tiles
    max_tiles: int = 4  # used when resolutions is empty: every grid of at most this many tiles
    max_side: int | None = None  # an image whose longer side exceeds this is first downscaled to it
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise InputError(f"tile_size: got {self.tile_size}; expected a positive number of pixels")
        self.resolutions = [tuple(int(v) for v in r) for r in self.resolutions] or tile_resolutions(
            self.tile_size, self.max_tiles
        )
        for height, width in self.resolutions:
            if height <= 0 or width <= 0 or height % self.tile_size or width % self.tile_size:
                raise InputError(
                    f"resolutions: got ({height}, {width}); expected positive multiples of tile_size={self.tile_size}"
                )

    def capped_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the (height, width) after the `max_side` cap (unchanged when within it)."""
        if self.max_side is None or max(height, width) <= self.max_side:
            return height, width
        scale = self.max_side / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Return the (rows, cols) of tiles an image of this size is cut into."""
        best_height, best_width = select_best_resolution(self.capped_size(height, width), self.resolutions)
        return best_height // self.tile_size, best_width // self.tile_size

    def num_tiles(self, height: int, width: int) -> int:
        """Return how many tiles (global view included) an image of this size becomes."""
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    def __call__(self, image: Image.Image) -> TiledImage:
        """Return the image's global view and tiles, in the order their visual tokens go into the prompt."""
        size = (image.height, image.width)
        capped = self.capped_size(*size)
        if capped != size:
            image = image.resize(capped[::-1], resample=self.resample)
        best = select_best_resolution(capped, self.resolutions)
        fitted = fit_size(capped, best)
        resized = np.asarray(image.resize(fitted[::-1], resample=self.resample))
        # Centre the resized image on a black canvas; the odd pixel of padding goes after (bottom, right).
        canvas = np.zeros((*best, 3), np.uint8)
        top, left = (best[0] - fitted[0]) // 2, (best[1] - fitted[1]) // 2
        canvas[top : top + fitted[0], left : left + fitted[1]] = resized
        t = self.tile_size
        rows, cols = best[0] // t, best[1] // t
        tiles = [
            Image.fromarray(canvas[r * t : (r + 1) * t, c * t : (c + 1) * t])
            for r in range(rows)
            for c in range(cols)
        ]
        global_view = image.resize((t, t), resample=self.resample)
        return TiledImage([global_view, *tiles], (rows, cols), size)
