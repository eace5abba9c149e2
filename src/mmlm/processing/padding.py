"""Padding token rows and caches to a common length.

Generation pads on the left, so every row's last prompt token sits at the same (right) edge and new tokens are
appended to all rows at once; the attention mask hides the padding. Training and text encoders pad on the right.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Side = Literal["left", "right"]


def pad_to(
    x: torch.Tensor, length: int, dim: int = -1, value: float = 0, side: Side = "left"
) -> torch.Tensor:
    """Return `x` padded with `value` to `length` entries along `dim`, before its entries (`side` "left") or
    after them; `x` itself when it is already that long."""
    dim = dim % x.dim()
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    # F.pad lists (before, after) pairs from the last dimension backwards
    return F.pad(
        x, (0, 0) * (x.dim() - 1 - dim) + ((missing, 0) if side == "left" else (0, missing)), value=value
    )


def left_pad(x: torch.Tensor, length: int, dim: int = -1, value: float = 0) -> torch.Tensor:
    """Return `x` padded with `value` before its entries to `length` along `dim` (a batch made to generate)."""
    return pad_to(x, length, dim, value, "left")


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor], value: int, side: Side = "left", length: int | None = None
) -> torch.Tensor:
    """Return rows of ids stacked into [B, L] long, each padded with `value` on `side` to `length` (default:
    the longest row's)."""
    tensors = [torch.as_tensor(row, dtype=torch.long) for row in rows]
    if length is None:
        length = max((len(t) for t in tensors), default=0)
    if not tensors:
        return torch.full((0, length), value, dtype=torch.long)
    return torch.stack([pad_to(t, length, 0, value, side) for t in tensors])
