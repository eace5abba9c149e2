"""The model side of dynamic resolution (LLaVA-NeXT "anyres"): the grid an image gets, and how its tiles'
features become its tokens.

`select_best_resolution` picks, from candidate (height, width) resolutions, the one that keeps most of an
image's pixels (mmlm.processing.anyres cuts the pixels with it; the model reads the same grid back from the
image's size, as transformers' LlavaNextModel does).

`SpatialUnpad` is LLaVA-NeXT's "spatial_unpad" merge (Liu et al. 2024, transformers' `pack_image_features`).
An image of size (H, W) is a global view plus rows×cols tiles, each g×g tokens after the connector. Its tokens:

    the global view's g² tokens, then the (rows·g)×(cols·g) canvas of the tiles' tokens, row-major, with the
    rows (or columns) that only saw the processor's centred black padding cut off (transformers' `unpad_image`),
    and a learned `image_newline` after each of the h' rows that remain:   g² + h'·w' + h' tokens.

The count depends on each image's size, so the processor reserves exactly that many slots (LlavaNextProcessor's
`_get_number_of_features`), and the model fills them with one gather from the tiles' tokens (`gather_index`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def unpadded_window(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """Return (top, bottom, left, right) of the part of a (height, width) `canvas` of tokens that an image of
    `size` (height, width) covers, after it was fitted and centred on the canvas (transformers' `unpad_image`)."""
    (height, width), (canvas_height, canvas_width) = size, canvas
    # the same float steps as transformers, so the rounding agrees on every size
    if width / height > canvas_width / canvas_height:
        covered = int(round(height * (canvas_width / width), 7))
        pad = (canvas_height - covered) // 2
        return pad, canvas_height - pad, 0, canvas_width
    covered = int(round(width * (canvas_height / height), 7))
    pad = (canvas_width - covered) // 2
    return 0, canvas_height, pad, canvas_width - pad


@dataclass(frozen=True)
class SpatialUnpad:
    """LLaVA-NeXT's spatial_unpad merge of an image's global view and tiles into its token sequence."""

    resolutions: tuple[tuple[int, int], ...]  # the grids' (height, width) in pixels: image_grid_pinpoints
    tile_size: int  # pixels per tile side (the tower's image_size)
    side: int  # tokens per tile side after the connector (g)

    def __post_init__(self) -> None:
        for height, width in self.resolutions:
            if height <= 0 or width <= 0 or height % self.tile_size or width % self.tile_size:
                raise InputError(
                    f"image_grid_pinpoints: got [{height}, {width}]; expected positive multiples of the "
                    f"tower's image_size {self.tile_size}"
                )
        if not self.resolutions:
            raise InputError("image_grid_pinpoints: expected at least one [height, width]")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Return the (rows, cols) of tiles an image of this size is cut into."""
        best_height, best_width = select_best_resolution((height, width), self.resolutions)
        return best_height // self.tile_size, best_width // self.tile_size

    def num_tiles(self, height: int, width: int) -> int:
        """Return the encoder inputs an image of this size becomes: rows·cols tiles + 1 global view."""
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Return (top, bottom, left, right) of the tile-token canvas an image of this size keeps; InputError if
        it keeps no row or column."""
        rows, cols = self.grid(height, width)
        top, bottom, left, right = unpadded_window((height, width), (rows * self.side, cols * self.side))
        if bottom <= top or right <= left:
            raise InputError(
                f"image {height}x{width} (height x width): too thin for its {rows}x{cols} grid of "
                f"{self.side}x{self.side}-token tiles, no token row or column is left after unpadding; "
                "expected a less extreme aspect ratio"
            )
        return top, bottom, left, right

    def num_tokens(self, height: int, width: int) -> int:
        """Return the LM tokens an image of this size becomes: g² + h'·w' + h' (one newline per kept row)."""
        top, bottom, left, right = self.window(height, width)
        return self.side**2 + (bottom - top) * (right - left + 1)

    def gather_index(self, sizes: Sequence[tuple[int, int]], tiles: int) -> torch.Tensor:
        """Return, for images of `sizes` whose `tiles` tile outputs lie one after another (global view first),
        the index [M] into their tokens flattened to [tiles·g², D] and then the newline (row tiles·g²) that
        lists every image's tokens in slot order."""
        g, per_tile = self.side, self.side**2
        counts = [self.num_tiles(*size) for size in sizes]
        if sum(counts) != tiles:
            raise InputError(
                f"pixel_values: got {tiles} tiles, but image_sizes {[list(s) for s in sizes]} make "
                f"{sum(counts)} with image_grid_pinpoints {[list(r) for r in self.resolutions]}"
            )
        newline, first, parts = tiles * per_tile, 0, []
        for (height, width), count in zip(sizes, counts, strict=True):
            rows, cols = self.grid(height, width)
            top, bottom, left, right = self.window(height, width)
            y = torch.arange(rows * g)[:, None]  # [rows·g, 1] canvas row
            x = torch.arange(cols * g)[None, :]  # [1, cols·g] canvas column
            tile = first + 1 + (y // g) * cols + x // g  # the global view is tile `first`
            canvas = (tile * per_tile + (y % g) * g + x % g)[top:bottom, left:right]  # [h', w']
            canvas = torch.cat([canvas, torch.full((bottom - top, 1), newline)], dim=1)  # [h', w' + 1]
            parts += [first * per_tile + torch.arange(per_tile), canvas.flatten()]
            first += count
        return torch.cat(parts)
