"""The patch merger (Qwen2-VL, Qwen2.5-VL): each merge_size × merge_size block of patches becomes one LM token.

The processor lays each image's patches out block by block (every m² consecutive patches are one square block),
so merging needs no grid: each patch is normalised (LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL), the m²
patches of a block are concatenated, and a two-layer GELU MLP maps them to the LM width:
    token_j = fc2(GELU(fc1([norm(x_{m²j}), ..., norm(x_{m²j + m² − 1})])))     [B, N, Dv] -> [B, N/m², D_lm]
"""

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.fusion.style import ConnectorStyle
from mmlm.layers.flops import linear_flops
from mmlm.layers.init import initialise, normal_init
from mmlm.layers.mlp import MLP
from mmlm.layers.norm import make_norm


class PatchMerger(nn.Module):
    """norm per patch, m² patches concatenated, then fc2(GELU(fc1(·))) to the LM width; m² fewer tokens."""

    def __init__(self, vision_dim: int, lm_dim: int, merge_size: int = 2, norm: str = "layer",
                 eps: float = 1e-6, init_std: float = 0.02) -> None:  # fmt: skip
        super().__init__()
        if merge_size < 1:
            raise InputError(f"scale_factor: got {merge_size}; expected a positive integer")
        self.merge_size = merge_size
        self.norm = make_norm(norm, vision_dim, eps)
        merged = vision_dim * merge_size**2
        self.mlp = MLP(merged, merged, act="gelu", out_dim=lm_dim)
        initialise(self, lambda m: normal_init(m, init_std))

    def num_tokens(self, num_patches: int) -> int:
        """Return the LM tokens `num_patches` patches become: one per merge block."""
        if num_patches % self.merge_size**2:
            raise InputError(
                f"num_patches: got {num_patches}; the patch merger takes whole {self.merge_size}x"
                f"{self.merge_size} blocks"
            )
        return num_patches // self.merge_size**2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return LM tokens, patch states [B, N, Dv] (block by block) -> [B, N/m², D_lm]."""
        b, n, _ = features.shape
        x = self.norm(features).reshape(b, self.num_tokens(n), -1)  # [B, N, Dv] -> [B, N/m², m²·Dv]
        return self.mlp(x)


class PatchMergerStyle(ConnectorStyle):
    """The patch merger as a fusion style. Its model keeps each prompt's M-RoPE position offset in the generation
    cache; merging running batches concatenates those offsets (MRopeState.cat), so rows may join a batch."""


def build_patch_merger(cfg: ConnectorConfig, vision_dim: int, lm_dim: int) -> PatchMerger:
    """Return the merger `cfg` describes (scale_factor: merge_size; norm: layer or rms)."""
    return PatchMerger(
        vision_dim, lm_dim, cfg.scale_factor, cfg.norm, cfg.norm_eps or 1e-6, cfg.initializer_range
    )


def patch_merger_cost(c: ConnectorConfig, x: FusionInput) -> FusionCost:
    """Qwen2-VL: every m×m block of each view's patches becomes one token through a two-layer MLP."""
    m2 = c.scale_factor**2
    tokens = x.features // m2
    width = x.vision_dim * m2
    flops = linear_flops(tokens, width, width) + linear_flops(tokens, width, x.lm.width)
    return FusionCost("patch_merger", tokens * x.views * x.slots, flops * x.views * x.slots)
