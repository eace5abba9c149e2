"""The building blocks every mmlm model is assembled from: attention, MLPs, norms, transformer blocks."""

from mmlm.layers.attention import Attention, KVCache
from mmlm.layers.mlp import MLP, GatedMLP, activation
from mmlm.layers.norm import RMSNorm, make_norm
from mmlm.layers.transformer import Block, Transformer

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "GatedMLP",
    "KVCache",
    "RMSNorm",
    "Transformer",
    "activation",
    "make_norm",
]
