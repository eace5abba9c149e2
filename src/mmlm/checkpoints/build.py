"""Build a model from a config and a checkpoint's tensors through a key map, without a random init first."""

from collections.abc import Callable

import torch
from torch import nn

from mmlm.checkpoints.keymap import Rule, to_ours


def build_from_weights(
    make_model: Callable[[], nn.Module],
    weights: dict[str, torch.Tensor],
    rules: list[Rule],
    source: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Return the model made by `make_model` holding `weights` renamed by `rules`, in eval mode."""
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = make_model()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(to_ours(weights, rules, shapes, source), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
