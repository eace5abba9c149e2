"""Connectors map vision-encoder tokens into the LM's embedding space; `build_connector` picks one by config.

Every connector is an `nn.Module` taking patch tokens [B, N, Dv] (no class token) and returning visual
tokens [B, N', D_lm], with `num_tokens(N) -> N'` so the processor can reserve exactly N' image tokens.
A new connector (Q-Former, Perceiver, ...) is one file plus one `register_connector` call below.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.perceiver import PerceiverConnector, PerceiverResampler
from mmlm.fusion.pixel_shuffle import PixelShuffleConnector, pixel_shuffle
from mmlm.fusion.projector import LLAVA_PROJECTOR_KEYS, LinearProjector, MLPProjector
from mmlm.fusion.qformer import build_qformer_connector

CONNECTOR_CONFIG_VERSION = 1


@dataclass
class ConnectorConfig:
    """Which connector to build and its options; fields a kind does not use are ignored."""

    # the fusion style: linear (LLaVA v1) | mlp (LLaVA-1.5) | pixel_shuffle (Idefics3, nanoVLM) | qformer (BLIP-2)
    # | perceiver (a resampler, its latents as tokens) | cross_attention (Flamingo: a resampler feeds gated
    # cross-attention blocks inside the LM) | unified (VQ image codes in the LM vocabulary, no connector)
    kind: str = "mlp"
    act: str = "gelu"  # mlp: the activation between the two layers
    bias: bool | None = None  # None: the reference's choice (linear, mlp: True; pixel_shuffle: False)
    scale_factor: int = 2  # pixel_shuffle: r, the side of each block of patches merged into one token
    num_queries: int = 32  # qformer: learned queries K; perceiver, cross_attention: latents L
    depth: int = 2  # qformer, perceiver, cross_attention: blocks of the Q-Former / resampler
    heads: int = 8  # qformer, perceiver, cross_attention: attention heads of those blocks
    head_dim: int | None = None  # None: width // heads
    width: int | None = None  # qformer: hidden size (None: the vision width)
    mlp_dim: int | None = None  # qformer, perceiver, cross_attention: MLP hidden size (None: 4 × width)
    cross_attention_frequency: int = 2  # qformer: every n-th block cross-attends to the image (BLIP-2: 2)
    cross_attn_every_n_layers: int = 4  # cross_attention: a gated block before every n-th LM layer
    max_frames: int = 0  # perceiver, cross_attention: frames with a learned time embedding (0: none)
    codebook_size: int = 256  # unified: VQ codes, added to the LM vocabulary
    norm_eps: float | None = None  # qformer: its LayerNorms' eps (None: BLIP-2's 1e-12)
    version: int = CONNECTOR_CONFIG_VERSION


@runtime_checkable
class Connector(Protocol):
    """An nn.Module from patch tokens [B, N, Dv] to visual tokens [B, num_tokens(N), D_lm]."""

    def num_tokens(self, num_patches: int) -> int:
        """Return how many visual tokens `num_patches` patch tokens become."""
        ...

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [B, N, Dv] -> [B, num_tokens(N), D_lm]."""
        ...


ConnectorBuilder = Callable[[ConnectorConfig, int, int], nn.Module]
CONNECTORS: dict[str, ConnectorBuilder] = {}


def register_connector(kind: str, builder: ConnectorBuilder) -> None:
    """Make `build_connector` build `builder(cfg, vision_dim, lm_dim)` for `cfg.kind == kind`."""
    CONNECTORS[kind] = builder


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int) -> nn.Module:
    """Return the connector `cfg.kind` names, mapping vision width `vision_dim` to LM width `lm_dim`."""
    if cfg.kind not in CONNECTORS:
        raise InputError(f"connector.kind: got {cfg.kind!r}; expected one of {sorted(CONNECTORS)}")
    return CONNECTORS[cfg.kind](cfg, vision_dim, lm_dim)


def _bias(cfg: ConnectorConfig, default: bool) -> bool:
    return default if cfg.bias is None else cfg.bias


register_connector("linear", lambda cfg, dv, dl: LinearProjector(dv, dl, bias=_bias(cfg, True)))
register_connector("mlp", lambda cfg, dv, dl: MLPProjector(dv, dl, act=cfg.act, bias=_bias(cfg, True)))
register_connector(
    "pixel_shuffle",
    lambda cfg, dv, dl: PixelShuffleConnector(dv, dl, scale_factor=cfg.scale_factor, bias=_bias(cfg, False)),
)
register_connector("qformer", build_qformer_connector)  # BLIP-2; width None: the vision width
register_connector(
    "perceiver",  # the resampler runs at vision width (as in Idefics); its MLP uses Idefics' ReLU, not cfg.act
    lambda cfg, dv, dl: PerceiverConnector(
        PerceiverResampler(dv, cfg.depth, cfg.num_queries, cfg.heads, cfg.head_dim or dv // cfg.heads,
                           cfg.mlp_dim or 4 * dv, max_frames=cfg.max_frames),
        dv, dl, bias=_bias(cfg, True),
    ),
)  # fmt: skip

__all__ = [
    "CONNECTORS",
    "LLAVA_PROJECTOR_KEYS",
    "Connector",
    "ConnectorConfig",
    "LinearProjector",
    "MLPProjector",
    "PerceiverConnector",
    "PerceiverResampler",
    "PixelShuffleConnector",
    "build_connector",
    "pixel_shuffle",
    "register_connector",
]
