"""The pooled projector (Gemma 3): the patch grid is average-pooled to a fixed number of tokens, normed, then
projected to the LM width by one linear layer without bias:
    tokens = W · RMSNorm(AvgPool_k(grid(x)))      [B, g², Dv] -> [B, (g/k)², Dv] -> [B, (g/k)², D_lm]
with k = scale_factor. Gemma 3's SigLIP at 896 px has a 64×64 grid; k = 4 leaves mm_tokens_per_image = 256.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.layers.flops import linear_flops
from mmlm.layers.init import initialise, normal_init
from mmlm.layers.norm import make_norm


class PooledProjector(nn.Module):
    """AvgPool k×k over the patch grid, a norm per token, then one linear to the LM width; k² fewer tokens."""

    def __init__(self, vision_dim: int, lm_dim: int, kernel: int = 4, norm: str = "rms_offset",
                 eps: float = 1e-6, init_std: float = 0.02) -> None:  # fmt: skip
        super().__init__()
        if kernel < 1:
            raise InputError(f"scale_factor: got {kernel}; expected a positive pooling kernel")
        self.kernel = kernel
        self.norm = make_norm(norm, vision_dim, eps)
        self.proj = nn.Linear(vision_dim, lm_dim, bias=False)
        initialise(self, lambda m: normal_init(m, init_std))

    def num_tokens(self, num_patches: int) -> int:
        """Return the LM tokens a square grid of `num_patches` patches becomes: (side // k)²."""
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise InputError(
                f"num_patches: got {num_patches}; the pooled projector needs a square patch grid"
            )
        return (side // self.kernel) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return LM tokens, patch states [B, g², Dv] (row by row) -> [B, (g/k)², D_lm]."""
        b, n, d = features.shape
        side = math.isqrt(n)
        grid = features.transpose(1, 2).reshape(b, d, side, side)  # [B, Dv, g, g]
        pooled = F.avg_pool2d(grid, self.kernel).flatten(2).transpose(1, 2)  # [B, (g/k)², Dv]
        return self.proj(self.norm(pooled))


def build_pooled_projector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int) -> PooledProjector:
    """Return the projector `cfg` describes (scale_factor: the pooling kernel; norm: rms_offset for Gemma 3)."""
    return PooledProjector(
        vision_dim, lm_dim, cfg.scale_factor, cfg.norm, cfg.norm_eps or 1e-6, cfg.initializer_range
    )


def pooled_projector_cost(c: ConnectorConfig, x: FusionInput) -> FusionCost:
    """Gemma 3: each k×k block of the patch grid is averaged into one token, then one linear layer."""
    k, side = c.scale_factor, math.isqrt(x.features)
    label = f"pooled k={k}"
    if x.merged or side * side != x.features:
        return FusionCost(label, None, note="n/a: no square patch grid")
    tokens = (side // k) ** 2
    per_view = x.views * x.slots
    return FusionCost(label, tokens * per_view, linear_flops(tokens, x.vision_dim, x.lm.width) * per_view)
