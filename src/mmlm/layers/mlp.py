"""Feed-forward blocks: the two-layer MLP (GELU, QuickGELU) and the gated SwiGLU MLP."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.layers.linear import project

QUICK_GELU_SCALE = 1.702


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x·σ(1.702x), computed as SiLU(1.702x)/1.702.

    The same function within float rounding (~1e-7 relative). SiLU is one fused kernel with a fused backward,
    where x * sigmoid(1.702x) runs three kernels and keeps their outputs for autograd: transformers'
    QuickGELUActivation takes 1.08-1.26x as long forward and backward on a small CLIP's and a ViT-B/16's MLP
    activations, one CPU thread (benchmarks/bench_activation.py, docs/benchmarks.md).
    """
    return F.silu(x * QUICK_GELU_SCALE) * (1 / QUICK_GELU_SCALE)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Names follow transformers' `hidden_act` values so configs translate one to one.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the activation function called `name`."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """fc2(act(fc1(x))), the ViT/CLIP/BERT feed-forward block."""

    def __init__(
        self, dim: int, hidden_dim: int, act: str = "gelu", bias: bool = True, out_dim: int | None = None
    ):
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block's output, same shape as `x` unless `out_dim` was set."""
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(act(gate(x)) · up(x)), the Llama feed-forward block."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.act = activation(act)
        self.gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block's output, same shape as `x`."""
        # `project` is the plain module call except when decoding a few rows on CPU (layers/linear.py)
        return self.down(self.act(project(self.gate, x)) * project(self.up, x))
