"""LLaVA's projectors: one linear map (LLaVA v1) or a 2-layer GELU MLP (LLaVA-1.5) from vision width to LM width.

Both keep one output token per input token, [B, N, Dv] -> [B, N, D_lm]. The MLP is `layers.MLP`, so its
weights are `fc1`/`fc2`; `LLAVA_PROJECTOR_KEYS` renames transformers' `multi_modal_projector.linear_1/2`.
"""

import torch
from torch import nn

from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.layers import MLP
from mmlm.layers.flops import linear_flops
from mmlm.layers.init import initialise, normal_init

# transformers' LlavaMultiModalProjector submodule -> ours (weight and bias follow the module name)
LLAVA_PROJECTOR_KEYS: dict[str, str] = {"linear_1": "fc1", "linear_2": "fc2"}


class LinearProjector(nn.Module):
    """LLaVA v1's connector: H_v = Z_v·W, one linear map per visual token."""

    def __init__(self, vision_dim: int, lm_dim: int, bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, lm_dim, bias=bias)
        initialise(self, lambda m: normal_init(m, init_std))  # transformers' LLaVA: N(0, initializer_range²)

    def num_tokens(self, num_patches: int) -> int:
        """Return the visual tokens this connector emits for `num_patches` patch tokens (the same number)."""
        return num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [B, N, Dv] -> [B, N, D_lm]."""
        return self.proj(features)


class MLPProjector(MLP):
    """LLaVA-1.5's connector: fc2(GELU(fc1(z))), with fc1: Dv -> D_lm and fc2: D_lm -> D_lm."""

    def __init__(
        self, vision_dim: int, lm_dim: int, act: str = "gelu", bias: bool = True, init_std: float = 0.02
    ) -> None:
        super().__init__(vision_dim, lm_dim, act=act, bias=bias, out_dim=lm_dim)
        initialise(self, lambda m: normal_init(m, init_std))  # transformers' LLaVA: N(0, initializer_range²)

    def num_tokens(self, num_patches: int) -> int:
        """Return the visual tokens this connector emits for `num_patches` patch tokens (the same number)."""
        return num_patches


def mlp_projector_flops(patches: int, vision_dim: int, lm_dim: int) -> int:
    """Return LLaVA-1.5's projector FLOPs: fc1 (Dv -> D_lm) and fc2 (D_lm -> D_lm) on every patch."""
    return linear_flops(patches, vision_dim, lm_dim) + linear_flops(patches, lm_dim, lm_dim)


def projector_cost(c: ConnectorConfig, x: FusionInput) -> FusionCost:
    """LLaVA (linear) and LLaVA-1.5 (mlp): every token of every view and frame, projected one by one."""
    per_view = x.views * x.slots
    if c.kind == "linear":
        return FusionCost(
            "linear", x.features * per_view, linear_flops(x.features, x.vision_dim, x.lm.width) * per_view
        )
    return FusionCost(
        "mlp", x.features * per_view, mlp_projector_flops(x.features, x.vision_dim, x.lm.width) * per_view
    )
