"""Pixel-shuffle connector (Idefics3, nanoVLM): space-to-depth on the patch grid, then one linear map.

Each r×r block of neighbouring patch tokens becomes one token whose channels are the block's tokens in
row-major order, so the LM sees r² fewer visual tokens at r² times the width:
    out[b, I·(w/r) + J, (dy·r + dx)·D + d] = x[b, (I·r + dy)·w + (J·r + dx), d]
which is the ordering of transformers' `Idefics3Connector.pixel_shuffle`.
"""

import math

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.layers.flops import linear_flops
from mmlm.layers.init import initialise, normal_init


def square_grid(num_patches: int, scale_factor: int) -> tuple[int, int]:
    """Return the (h, w) of a square patch grid of `num_patches` tokens whose side `scale_factor` divides."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise InputError(f"num_patches: got {num_patches}; pixel shuffle expects a square patch grid")
    if side % scale_factor:
        raise InputError(
            f"scale_factor: the {side}x{side} patch grid is not divisible by scale_factor={scale_factor}"
        )
    return side, side


def pixel_shuffle(x: torch.Tensor, scale_factor: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Return `x` space-to-depth rearranged by `scale_factor`, [B, h·w, D] -> [B, h·w/r², D·r²]."""
    b, n, d = x.shape
    r = scale_factor
    h, w = grid if grid is not None else square_grid(n, r)
    if h * w != n or h % r or w % r:
        raise InputError(
            f"grid: got {h}x{w} for {n} tokens; expected h·w = {n} with h and w divisible by {r}"
        )
    x = x.reshape(b, h // r, r, w // r, r, d)  # [B, I, dy, J, dx, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, I, J, dy, dx, D]
    return x.reshape(b, (h // r) * (w // r), r * r * d)  # [B, h·w/r², r²·D]


class PixelShuffleConnector(nn.Module):
    """Pixel shuffle by `scale_factor` then a linear map to the LM width; r² fewer tokens than patches."""

    def __init__(
        self, vision_dim: int, lm_dim: int, scale_factor: int = 2, bias: bool = False, init_std: float = 0.02
    ) -> None:
        super().__init__()
        if scale_factor < 1:
            raise InputError(f"scale_factor: got {scale_factor}; expected a positive integer")
        self.scale_factor = scale_factor
        # Idefics3 and nanoVLM name this projection `proj` and give it no bias
        self.proj = nn.Linear(vision_dim * scale_factor**2, lm_dim, bias=bias)
        initialise(
            self, lambda m: normal_init(m, init_std)
        )  # transformers' Idefics3: N(0, initializer_range²)

    def num_tokens(self, num_patches: int) -> int:
        """Return the visual tokens emitted for a square grid of `num_patches` patches: num_patches / r²."""
        square_grid(num_patches, self.scale_factor)
        return num_patches // self.scale_factor**2

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Return visual tokens in LM width, [B, h·w, Dv] -> [B, h·w/r², D_lm]; `grid` defaults to square."""
        return self.proj(pixel_shuffle(features, self.scale_factor, grid))


def pixel_shuffle_flops(patches: int, vision_dim: int, lm_dim: int, r: int) -> int:
    """Return the pixel-shuffle connector's FLOPs: one linear map on N/r² tokens of width Dv·r²."""
    return linear_flops(patches // r**2, vision_dim * r**2, lm_dim)


def pixel_shuffle_cost(c: ConnectorConfig, x: FusionInput) -> FusionCost:
    """Idefics3 / nanoVLM: each r×r block of the patch grid becomes one token, N/r² per view and frame."""
    r, side = c.scale_factor, math.isqrt(x.features)
    label = f"pixel_shuffle r={r}"
    if x.merged or side * side != x.features or side % r:
        why = "ToMe leaves no patch grid" if x.merged else f"{side}² grid not divisible by r={r}"
        return FusionCost(label, None, note=f"n/a: {why}")
    per_view = x.views * x.slots
    return FusionCost(label, x.features // r**2 * per_view,
                      pixel_shuffle_flops(x.features, x.vision_dim, x.lm.width, r) * per_view)  # fmt: skip
