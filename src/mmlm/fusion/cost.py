"""What a fusion style costs for one image: the budget planner's (mmlm/models/budget.py) question to each style.

Each style answers `FusionStyle.cost(cfg, FusionInput) -> FusionCost` in its own file; the planner adds the
LM prefill over the visual + text tokens and the KV cache, which are the same for every style.
"""

from dataclasses import dataclass
from typing import Protocol


class LMSizes(Protocol):
    """The LM sizes a style's cost depends on (mmlm.models.budget.LMShape has them)."""

    width: int
    layers: int
    heads: int
    head_dim: int
    mlp_dim: int


@dataclass(frozen=True)
class FusionInput:
    """What a fusion style sees of one image: tokens per view from the tower, widths, views, frames."""

    features: int  # tokens per view reaching the connector (after ToMe and feature_select)
    vision_dim: int  # their width (several feature layers are concatenated)
    lm: LMSizes
    views: int
    frames: int  # frames the tower encodes (a resampler reads them all together)
    slots: int  # frame slots a per-frame connector fills (frames / video_pool, rounded up)
    text_tokens: int
    merged: bool  # ToMe ran, so the tokens are no longer a patch grid
    dtype_bytes: int


@dataclass(frozen=True)
class FusionCost:
    """A fusion style's share of one image: its visual tokens in the LM sequence and what they cost."""

    label: str
    tokens: int | None  # None: the style does not apply (see note)
    connector_flops: int = 0
    media_tokens: int = 0  # tokens outside the sequence that the LM reads (Flamingo's latents)
    lm_extra_flops: int = 0  # work the style adds inside the LM (Flamingo's gated blocks)
    kv_extra_bytes: int = 0  # cache the style adds (the gated blocks' media keys/values)
    note: str = ""
