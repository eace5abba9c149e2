"""Weight initialisation recipes for fresh models, as small functions every model family composes.

A model's constructor calls `initialise(self, recipe)` once, with its reference's recipe (open_clip's
`init_parameters` for the dual encoder's towers, transformers' `_init_weights` for the LM, Q-Former, Perceiver and
audio encoder). `initialise` does nothing when the model is built on the meta device: that is how every loader
builds a model whose weights a checkpoint is about to replace, so loading never runs a random init first.

PyTorch's defaults are no recipe for from-scratch training: nn.Embedding draws N(0, 1), so a fresh tied-head LM
starts at a loss near 100 instead of ln(vocab), and nn.Linear keeps Kaiming-uniform whatever the depth.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from mmlm.layers.attention import Attention
from mmlm.layers.mlp import MLP, GatedMLP
from mmlm.layers.norm import RMSNorm
from mmlm.layers.transformer import Transformer

NORMS = (nn.LayerNorm, RMSNorm)


def on_meta(module: nn.Module) -> bool:
    """Return True if any of `module`'s parameters or buffers live on the meta device (a loader is building it)."""
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def initialise(module: nn.Module, recipe: Callable[[nn.Module], None]) -> None:
    """Run `recipe(module)` without autograd, unless the module is on the meta device (weights come from a file)."""
    if on_meta(module):
        return
    with torch.no_grad():
        recipe(module)


def zero_bias(module: nn.Module) -> None:
    """Set `module.bias` to zero if it has one."""
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def normal_linear(linear: nn.Module, std: float) -> None:
    """Draw a Linear's (or convolution's) weight from N(0, std²) and zero its bias."""
    nn.init.normal_(linear.weight, std=std)
    zero_bias(linear)


def reset_norms(module: nn.Module) -> None:
    """Set every LayerNorm and RMSNorm in `module` to the identity: weight 1 (0 under a unit offset), bias 0."""
    for m in module.modules():
        if isinstance(m, NORMS):
            (nn.init.zeros_ if getattr(m, "unit_offset", False) else nn.init.ones_)(m.weight)
            zero_bias(m)


def normal_init(module: nn.Module, std: float) -> None:
    """transformers' `_init_weights`: every Linear, convolution and Embedding N(0, std²), biases 0, norms identity.

    Raw nn.Parameters (queries, latents, gates, positions) are left to the caller's recipe.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding):
            normal_linear(m, std)
    reset_norms(module)


def open_clip_transformer_init(transformer: Transformer, width: int) -> None:
    """open_clip's `TextTransformer.init_parameters` for a stack of pre-norm blocks of `width` channels.

    Attention in-projection N(0, width⁻¹), MLP c_fc N(0, (2·width)⁻¹), and the two projections that write into
    the residual stream (attention out, MLP c_proj) N(0, width⁻¹/(2·layers)), so the stream's variance grows
    with depth no faster than at one layer. Biases 0 (open_clip keeps nn.MultiheadAttention's zero biases and
    PyTorch's uniform MLP biases; we zero those too, as transformers' CLIP does), norms identity.
    """
    layers = len(transformer.blocks)
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in transformer.blocks:
        attention: Attention = block.attn
        for linear in (attention.qkv,) if not attention.cross else (attention.q, attention.kv):
            normal_linear(linear, attn_std)
        normal_linear(attention.out, proj_std)
        mlp = block.mlp
        first, last = (mlp.fc1, mlp.fc2) if isinstance(mlp, MLP) else (mlp.gate, mlp.down)
        if isinstance(mlp, GatedMLP):
            normal_linear(mlp.up, fc_std)
        normal_linear(first, fc_std)
        normal_linear(last, proj_std)
    reset_norms(transformer)


def xavier_uniform_fused(weight: torch.Tensor, fan_out: int) -> None:
    """Xavier-uniform `weight` [out, in] as if it were a slice of a fused matrix with `fan_out` rows.

    SigLIP's attention-pooling head draws nn.MultiheadAttention's one in-projection [3D, D]; ours is split into
    q [D, D] and kv [2D, D], so each part takes the fused bound √(6 / (D + 3D)).
    """
    bound = math.sqrt(6.0 / (weight.shape[1] + fan_out))
    nn.init.uniform_(weight, -bound, bound)
