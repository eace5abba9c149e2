"""Rotary position embeddings (RoFormer, Su et al. 2021) with the frequency scalings Llama checkpoints use.

Each pair of channels (i, i + d/2) of a query or key at position p is rotated by the angle p·θ_i, with
θ_i = base^(-2i/d). We use the half-split pairing of transformers' Llama (its checkpoints' q/k weights are
permuted for it), not the interleaved (2i, 2i + 1) pairing of Meta's original code.
"""

import math
from typing import Any

import torch

from mmlm.errors import InputError

ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> tuple[float, ...]:
    """Return the head_dim/2 inverse frequencies θ_i, computed in fp32 exactly as transformers does."""
    # On the CPU even while a model is built on the meta device: these are numbers, not weights.
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    )
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        # Position interpolation (Chen et al. 2023): p -> p / factor, folded into the frequencies.
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif kind != "default":
        raise InputError(f"rope_scaling: rope_type {kind!r} is not supported; expected one of {ROPE_TYPES}")
    return tuple(inv_freq.tolist())


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: wavelengths longer than old_len/low_freq_factor are stretched by `factor`, shorter than
    # old_len/high_freq_factor are kept, and the band between is interpolated linearly in old_len/wavelength.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: tuple[float, ...] | torch.Tensor,
    dtype: torch.dtype,
    sections: tuple[int, ...] | list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, signed sin) of the rotation angles, [B, T, 1, head_dim] each, for positions [B, T].

    The sine's first half is negated, so that `apply_rotary` needs no negation per layer. With `sections`,
    positions carry A axes, [A, B, T], and frequency θ_i reads axis k where sections[k] holds i (the axes
    cycle when there are more sections than axes): M-RoPE (Qwen2-VL, Wang et al. 2024 §2.1) splits the
    frequencies into (temporal, height, width) sections; a 2-D axial rotary is two sections over (h, w).
    """
    freq = inv_freq  # given as a float32 device tensor by a step captured as a CUDA graph: no host copy there
    if not isinstance(freq, torch.Tensor):
        freq = torch.tensor(inv_freq, dtype=torch.float32, device=position_ids.device)
    if sections is None:
        angles = position_ids.float()[..., None] * freq  # [B, T, d/2], fp32 like the reference
    else:
        if sum(sections) != len(inv_freq):
            raise InputError(
                f"mrope_section: {list(sections)} sums to {sum(sections)}; expected {len(inv_freq)}"
            )
        axes = position_ids.shape[0]
        axis = torch.cat([torch.full((n,), k % axes) for k, n in enumerate(sections)]).to(position_ids.device)
        # [A, B, T] -> [B, T, d/2]: frequency i rotates by the position on its own axis
        positions = position_ids.float().permute(1, 2, 0)[..., axis]
        angles = positions * freq
    cos, sin = angles.cos(), angles.sin()
    # [B, T, 1, d]: channel i and i + d/2 share θ_i
    return torch.cat([cos, cos], -1)[:, :, None].to(dtype), torch.cat([-sin, sin], -1)[:, :, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Return x [B, T, heads, d] rotated: x·cos + rotate_half(x)·sin, where rotate_half(a, b) = (−b, a).

    With signed_sin = (−sin, sin), rotate_half(x)·sin = (b, a)·signed_sin: the same products, one op fewer.
    """
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([b, a], dim=-1) * signed_sin
