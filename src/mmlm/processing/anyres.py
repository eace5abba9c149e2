"""Dynamic resolution (LLaVA-NeXT "anyres"): cut a large image into encoder-sized tiles plus a global view.

From a list of candidate resolutions (multiples of the tile size), `select_best_resolution` picks the one
that keeps the most of the image's pixels and, among those, wastes the least padding. The image is resized
to fit it with its aspect ratio kept, padded to it with black, centred, and cut into rows×cols tiles in
row-major order; the whole image squashed to one tile comes first as the global view. This matches
transformers' LlavaNextImageProcessorPil pixel for pixel.

What the tiles become is the model's choice (VLMConfig.patch_merge): "flat", mmlm's own models' default,
gives every tile, global view included, the connector's full token count, so an image costs
(1 + rows·cols) × tile tokens; "spatial_unpad", LLaVA-NeXT's (transformers' llava_next folders load with it),
un-pads the tiles' canvas to the image's aspect ratio and adds a newline token per row (mmlm.models.anyres).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mmlm.errors import InputError
from mmlm.models.anyres import select_best_resolution

__all__ = ["DynamicResolution", "TiledImage", "fit_size", "select_best_resolution", "tile_resolutions"]


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

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], default_resolutions: Sequence[Sequence[int]] = ()
    ) -> "DynamicResolution":
        """Return the tiling a transformers LlavaNextImageProcessor config describes (its image_grid_pinpoints,
        else `default_resolutions`)."""
        crop, size = config.get("crop_size") or {}, config.get("size") or {}
        # older files write bare ints: crop_size 336 is a square, size 336 the shortest edge
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        size = {"shortest_edge": size} if isinstance(size, int) else size
        # LlavaNextImageProcessor's tile side: crop_size's height (even with do_center_crop off), else size's
        tile = crop.get("height") or size.get("height") or size.get("shortest_edge")
        # its global view: the whole image squashed to size (shortest_edge: a square of it)
        view = (size["height"], size.get("width")) if "height" in size else (size.get("shortest_edge"),) * 2
        square = crop.get("width", tile) == tile
        if not isinstance(tile, int) or view != (tile, tile) or not square:
            raise InputError(
                f"image processor: size {dict(size)} and crop_size {dict(crop)}: mmlm's anyres tiles need the "
                "global view and the tiles the same square size"
            )
        resolutions = config.get("image_grid_pinpoints") or default_resolutions
        if not all(isinstance(r, Sequence) and len(r) == 2 for r in resolutions):
            raise InputError(f"image_grid_pinpoints: got {resolutions!r}; expected [height, width] pairs")
        return cls(tile, [tuple(r) for r in resolutions], resample=int(config.get("resample", cls.resample)))

    def to_hf(self) -> dict[str, Any]:
        """Return the LlavaNextImageProcessor keys of this tiling (added to the image processor's own)."""
        t = self.tile_size
        # crop_size sets LlavaNextImageProcessor's tile side even when it does not centre-crop
        return {"image_processor_type": "LlavaNextImageProcessor", "crop_size": {"height": t, "width": t},
                "image_grid_pinpoints": [list(r) for r in self.resolutions], "do_pad": True}  # fmt: skip

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
