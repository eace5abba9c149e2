"""Fusion styles join the vision encoder's tokens to the LM; `connector.kind` names one, `fusion_style` finds it.

Most styles are connectors: an `nn.Module` taking patch tokens [B, N, Dv] (no class token) and returning visual
tokens [B, N', D_lm], with `num_tokens(N) -> N'` so the processor can reserve exactly N' image tokens. A new
connector (Q-Former, Perceiver, ...) is one file plus one `register_connector` line below; a style that reaches
inside the LM or its vocabulary is one file with a `FusionStyle` subclass plus one `register_style` line
(fusion/style.py says what a style answers).
"""

from mmlm.fusion.config import CONNECTOR_CONFIG_VERSION, ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.fusion.flamingo import FlamingoStyle
from mmlm.fusion.patch_merger import PatchMerger, PatchMergerStyle, build_patch_merger, patch_merger_cost
from mmlm.fusion.perceiver import PerceiverConnector, PerceiverResampler, perceiver_cost
from mmlm.fusion.pixel_shuffle import PixelShuffleConnector, pixel_shuffle, pixel_shuffle_cost
from mmlm.fusion.pooled_projector import PooledProjector, build_pooled_projector, pooled_projector_cost
from mmlm.fusion.projector import LLAVA_PROJECTOR_KEYS, LinearProjector, MLPProjector, projector_cost
from mmlm.fusion.qformer import build_qformer_connector, qformer_cost
from mmlm.fusion.style import (
    CONNECTORS,
    STYLES,
    Connector,
    FusionStyle,
    build_connector,
    fusion_style,
    register_connector,
    register_style,
)
from mmlm.fusion.unified import UnifiedStyle


def _bias(cfg: ConnectorConfig, default: bool) -> bool:
    return default if cfg.bias is None else cfg.bias


# registration order is the budget's comparison-table order (the MULTIMODAL_LLMS chapter's); `comparison`
# gives a style its row there, with K = 32 queries (Q-Former) or L = 64 latents (Perceiver, Flamingo)
register_connector(
    "linear", lambda cfg, dv, dl: LinearProjector(dv, dl, _bias(cfg, True), cfg.initializer_range),
    projector_cost, any_length=True,
)  # fmt: skip
register_connector(
    "mlp", lambda cfg, dv, dl: MLPProjector(dv, dl, cfg.act, _bias(cfg, True), cfg.initializer_range),
    projector_cost, any_length=True, comparison={},
)  # fmt: skip
register_connector(
    "pixel_shuffle",
    lambda cfg, dv, dl: PixelShuffleConnector(
        dv, dl, cfg.scale_factor, _bias(cfg, False), cfg.initializer_range
    ),
    pixel_shuffle_cost, comparison={},
)  # fmt: skip
register_connector("qformer", build_qformer_connector, qformer_cost, any_length=True,
                   comparison={"num_queries": 32})  # BLIP-2; width None: the vision width  # fmt: skip
register_connector(
    "perceiver",  # the resampler runs at vision width (as in Idefics); its MLP uses Idefics' ReLU, not cfg.act
    lambda cfg, dv, dl: PerceiverConnector(
        PerceiverResampler(dv, cfg.depth, cfg.num_queries, cfg.heads, cfg.head_dim or dv // cfg.heads,
                           cfg.mlp_dim or 4 * dv, cfg.max_frames, init_std=cfg.initializer_range),
        dv, dl, bias=_bias(cfg, True), init_std=cfg.initializer_range,
    ),
    perceiver_cost, any_length=True, reads_frames=True, comparison={"num_queries": 64},
)  # fmt: skip
register_style(FlamingoStyle())  # Flamingo: a resampler feeds gated cross-attention blocks inside the LM
register_style(UnifiedStyle())  # VQ image codes in the LM vocabulary, no connector
CONNECTORS["patch_merger"] = build_patch_merger  # Qwen2-VL; a style of its own, no table row
register_style(PatchMergerStyle("patch_merger", patch_merger_cost))
register_connector("pooled", build_pooled_projector, pooled_projector_cost)  # Gemma 3; no table row

__all__ = [
    "CONNECTORS",
    "CONNECTOR_CONFIG_VERSION",
    "LLAVA_PROJECTOR_KEYS",
    "STYLES",
    "Connector",
    "ConnectorConfig",
    "FusionCost",
    "FusionInput",
    "FusionStyle",
    "LinearProjector",
    "MLPProjector",
    "PatchMerger",
    "PooledProjector",
    "PerceiverConnector",
    "PerceiverResampler",
    "PixelShuffleConnector",
    "build_connector",
    "fusion_style",
    "pixel_shuffle",
    "register_connector",
    "register_style",
]
