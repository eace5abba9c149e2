"""LLaVA's projectors: one linear map (LLaVA v1) or a 2-layer GELU MLP (LLaVA-1.5) from vision width to LM width.

Both keep one output token per input token, [B, N, Dv] -> [B, N, D_lm]. The MLP is `layers.MLP`, so its
weights are `fc1`/`fc2`; `LLAVA_PROJECTOR_KEYS` renames transformers' `multi_modal_projector.linear_1/2`.
"""

import torch
from torch import nn

from mmlm.layers import MLP

# transformers' LlavaMultiModalProjector submodule -> ours (weight and bias follow the module name)
LLAVA_PROJECTOR_KEYS: dict[str, str] = {"linear_1": "fc1", "linear_2": "fc2"}


class LinearProjector(nn.Module):
    """LLaVA v1's connector: H_v = Z_v·W, one linear map per visual token."""

    def __init__(self, vision_dim: int, lm_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, lm_dim, bias=bias)

    def num_tokens(self, num_patches: int) -> int:
        """Return the visual tokens this connector emits for `num_patches` patch tokens (the same number)."""
        return num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [B, N, Dv] -> [B, N, D_lm]."""
        return self.proj(features)


class MLPProjector(MLP):
    """LLaVA-1.5's connector: fc2(GELU(fc1(z))), with fc1: Dv -> D_lm and fc2: D_lm -> D_lm."""

    def __init__(self, vision_dim: int, lm_dim: int, act: str = "gelu", bias: bool = True) -> None:
        super().__init__(vision_dim, lm_dim, act=act, bias=bias, out_dim=lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        """Return the visual tokens this connector emits for `num_patches` patch tokens (the same number)."""
        return num_patches
