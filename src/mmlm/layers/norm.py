"""LayerNorm and RMSNorm (Llama's, or Gemma's with a unit offset on the weight), chosen by name, and a LayerNorm
with its own scale and shift per attention head."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): x / sqrt(mean(x²) + eps) · w, computed in fp32.

    With `unit_offset` (Gemma) the scale is (1 + w), w starts at 0, and the product is taken in fp32 before the
    cast back, as Gemma's reference does (Llama casts first, then multiplies).
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised tensor in the input's dtype."""
        # one fused op for x·rsqrt(mean(x²) + eps) in fp32; the weight multiplies after the cast back, as in Llama
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class HeadwiseLayerNorm(nn.Module):
    """LayerNorm over head_dim whose weight and bias are [heads, head_dim]: each head has its own (Chameleon's qk norm).

    Chameleon trained with heads sharded over devices, each shard keeping its own affine parameters; the
    statistics are still per head, over head_dim. Input [..., heads, head_dim].
    """

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised tensor, same shape as x [..., heads, head_dim]."""
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * self.weight + self.bias


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """Return a `layer` (LayerNorm), `rms` (RMSNorm) or `rms_offset` (Gemma's RMSNorm, scale 1 + w) norm over
    the last dimension."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind in ("rms", "rms_offset"):
        return RMSNorm(dim, eps=eps, unit_offset=kind == "rms_offset")
    raise ValueError(f"unknown norm {kind!r}; expected 'layer', 'rms' or 'rms_offset'")
