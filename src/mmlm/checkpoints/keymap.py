"""Explicit key maps between a checkpoint's tensor names and mmlm's parameter names.

A rule pairs our names with theirs. Where one side holds several tensors (q, k, v in a checkpoint against
our fused qkv), they are concatenated along dim 0 on that side and split by `sizes` on the other.
A `transpose` rule stores a matrix the other way round (open_clip's `proj` [in, out] against our Linear [out, in]).
"""

from dataclasses import dataclass

import torch

from mmlm.errors import InputError


@dataclass(frozen=True)
class Rule:
    """One renamed (and possibly fused or split) tensor: ours <-> theirs."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] | None = None  # rows of each tensor on the side that has several
    their_shape: tuple[int, ...] | None = (
        None  # their shape (each one's, if fused) where it differs from ours
    )
    transpose: bool = False  # one 2-D tensor on each side, theirs = oursᵀ


def rename(
    ours: str, theirs: str, their_shape: tuple[int, ...] | None = None, transpose: bool = False
) -> Rule:
    """Return a one-to-one rule (theirs = oursᵀ when `transpose`)."""
    return Rule((ours,), (theirs,), their_shape=their_shape, transpose=transpose)


def linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    """Return rules for a linear (or norm) layer's weight and, optionally, bias."""
    return [rename(f"{ours}.{p}", f"{theirs}.{p}") for p in (("weight", "bias") if bias else ("weight",))]


def fused(ours: str, theirs: list[str], sizes: tuple[int, ...], bias: bool = True) -> list[Rule]:
    """Return rules fusing several of their linears (e.g. q, k, v) into one of ours."""
    params = ("weight", "bias") if bias else ("weight",)
    return [Rule((f"{ours}.{p}",), tuple(f"{t}.{p}" for t in theirs), sizes) for p in params]


def _move(src: list[torch.Tensor], shapes: list[torch.Size | tuple[int, ...]], sizes) -> list[torch.Tensor]:
    whole = torch.cat([t.reshape(1) if t.dim() == 0 else t for t in src])
    parts = whole.split(list(sizes)) if len(shapes) > 1 else [whole]
    return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]


def to_ours(
    theirs: dict[str, torch.Tensor], rules: list[Rule], our_shapes: dict[str, torch.Size], source: str
) -> dict[str, torch.Tensor]:
    """Return our state dict from a checkpoint's tensors; every tensor must be used (buffers like position_ids aside)."""
    ours, used = {}, set()
    for rule in rules:
        missing = [t for t in rule.theirs if t not in theirs]
        if missing:
            raise InputError(
                f"{source}: tensor {missing[0]!r} is missing; the checkpoint does not match its config"
            )
        sizes = rule.sizes if len(rule.ours) > 1 else None
        src = [theirs[t].T if rule.transpose else theirs[t] for t in rule.theirs]
        strangers = [o for o in rule.ours if o not in our_shapes]
        if strangers:
            raise InputError(
                f"{source}: tensor {strangers[0]!r} has no place in the model; does config.json match?"
            )
        shapes = [our_shapes[o] for o in rule.ours]
        if rule.their_shape is None:  # a rename keeps the shape; a fused tensor keeps its trailing dims
            got = (sum(t.shape[0] for t in src), *src[0].shape[1:]) if src[0].dim() else ()
            want = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes[0]) else ()
            if tuple(got) != tuple(want):
                raise InputError(
                    f"{source}: tensor {rule.theirs[0]!r} has shape {list(got)}, expected {list(want)}"
                )
        moved = _move(src, shapes, sizes)
        ours.update(zip(rule.ours, moved, strict=True))
        used.update(rule.theirs)
    unused = sorted(k for k in set(theirs) - used if not k.endswith("position_ids"))
    if unused:
        raise InputError(f"{source}: {len(unused)} tensors have no place in the model, e.g. {unused[0]!r}")
    return ours


def to_theirs(ours: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Return a checkpoint's state dict (their names and shapes) from ours."""
    out = {}
    for rule in rules:
        src = [ours[o].T if rule.transpose else ours[o] for o in rule.ours]
        if len(rule.theirs) > 1:
            shapes = [rule.their_shape or (n, *src[0].shape[1:]) for n in rule.sizes]
        else:
            shapes = [rule.their_shape if rule.their_shape is not None else src[0].shape]
            if len(src) > 1:
                shapes = [(sum(t.shape[0] for t in src), *src[0].shape[1:])]
        out.update(zip(rule.theirs, _move(src, shapes, rule.sizes), strict=True))
    return out
