"""Flamingo fusion (Alayrac et al. 2022): a Perceiver resampler feeds gated cross-attention blocks inside the LM.

Unlike the token connectors, the image does not enter the LM's sequence: each `<image>` keeps one slot, filled
with a learned marker embedding, and the resampler's L latents per image are the *media* that gated
cross-attention blocks, one before every n-th LM layer, attend to. A text token sees only the media of the most
recent `<image>` at or before it (`media_attention_mask`). The gates are tanh(α) with α = 0 at the start, so
the untrained fusion leaves the base LM's outputs exactly as they were.

The media of a batch travel in a `MediaCache`, passed in and returned like the KV cache: generation carries it
beside the LM's layer caches (the VLM's cache, mmlm.models.vlm.VLMCache), so rows dropped from the batch are
dropped from the media as well. `FlamingoStyle` is how the rest of mmlm sees all this (fusion/style.py).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput, LMSizes
from mmlm.fusion.cross_attention import GatedCrossAttentionBlock, media_attention_mask
from mmlm.fusion.perceiver import PerceiverResampler, perceiver_resampler_flops
from mmlm.fusion.style import BeforeBlock, FusionStyle
from mmlm.layers.attention import KVCache
from mmlm.layers.flops import cross_attention_flops, kv_cache_bytes, mlp_flops


@dataclass
class MediaCache:
    """The media of each row and which of them each position sees: tokens [B, S, Dv], mask [B, T, S]; and each
    gated block's keys/values of the media, computed once when generation first runs the block."""

    tokens: torch.Tensor
    mask: torch.Tensor
    keys_values: dict[int, KVCache] | None = None  # None: recompute every call (training)

    @property
    def length(self) -> int:
        """Return the positions the mask covers (the prompt's length)."""
        return self.mask.shape[1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (generation drops finished rows)."""
        self.tokens, self.mask = self.tokens[rows], self.mask[rows]
        for cache in (self.keys_values or {}).values():
            cache.select(rows)

    def for_generation(self) -> "MediaCache":
        """Return these media with an empty key/value cache per gated block, for one generation call."""
        return MediaCache(self.tokens, self.mask, {})

    def take(self, rows: torch.Tensor, length: int) -> "MediaCache":
        """Return the media of `rows`, with the mask of their first `length` positions."""
        return MediaCache(self.tokens[rows], self.mask[rows, :length])

    def mask_for(self, length: int) -> torch.Tensor:
        """Return the mask of `length` new positions: the prompt's own, or after it the last prompt position's.

        Generated tokens add no image, so each sees what the prompt's last token saw.
        """
        return self.mask if length == self.length else self.mask[:, -1:].expand(-1, length, -1)


class LMShape(Protocol):
    """The LM sizes the gated blocks are built for (an LMConfig has them)."""

    width: int
    heads: int
    layers: int
    mlp_dim: int
    act: str
    norm_eps: float

    @property
    def dim_per_head(self) -> int: ...


class FlamingoFusion(nn.Module):
    """The resampler, the `<image>` marker and the gated cross-attention blocks keyed by LM layer."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm: LMShape) -> None:
        super().__init__()
        self.media_dim = vision_dim
        self.media_reset_token_id = cfg.media_reset_token_id
        self.resampler = None
        if cfg.resampler:
            self.resampler = PerceiverResampler(
                vision_dim, cfg.depth, cfg.num_queries, cfg.heads, cfg.head_dim or vision_dim // cfg.heads,
                cfg.mlp_dim or 4 * vision_dim, max_frames=cfg.max_frames, qk_layer_norms=cfg.resampler_qk_norm,
                init_std=cfg.initializer_range,
            )  # fmt: skip
        self.marker_token_id = cfg.marker_token_id
        if self.marker_token_id is None:  # the LM's input where each <image> was
            self.marker = nn.Parameter(torch.zeros(1, 1, lm.width))
        # the blocks use the LM's own activation and norm eps, as Idefics builds them from its LM's config
        self.blocks = nn.ModuleDict(
            {
                str(layer): GatedCrossAttentionBlock(
                    lm.width,
                    vision_dim,
                    lm.heads,
                    lm.dim_per_head,
                    lm.mlp_dim,
                    act=lm.act,
                    alpha_type=cfg.alpha_type,
                    qk_norm=cfg.qk_norm,
                    eps=lm.norm_eps,
                    init_std=cfg.initializer_range,
                )  # fmt: skip
                for layer in range(0, lm.layers, cfg.cross_attn_every_n_layers)
            }
        )

    def num_tokens(self, num_patches: int) -> int:
        """Return the LM slots of one image: the marker alone, whatever the patches."""
        return 1

    def markers(self, images: int, lm: nn.Module) -> torch.Tensor:
        """Return the marker embedding of `images` images, [I, 1, D_lm]: learned, or the marker token's own."""
        if self.marker_token_id is None:
            return self.marker.expand(images, 1, -1)
        token = torch.full((1, 1), self.marker_token_id, device=lm.token_embed.weight.device)
        return lm.embed(token).expand(images, 1, -1)

    def resample(self, features: torch.Tensor) -> torch.Tensor:
        """Return the media of each image, [I, N, Dv] -> [I, L, Dv] (the features themselves without resampler)."""
        return features if self.resampler is None else self.resampler(features)

    def media(
        self, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor | None
    ) -> MediaCache:
        """Return each row's resampled media and the media mask for ids [B, T] and patch features [I, N, Dv].

        The images are the rows' `<image>` slots in order, row by row, as the processor collates them.
        """
        batch = len(input_ids)
        if features is None:  # text only: one masked-out slot, so the blocks still run (and add 0)
            weight = next(self.blocks.parameters())
            tokens = weight.new_zeros(batch, 1, self.media_dim)
            mask = torch.zeros(batch, input_ids.shape[1], 1, dtype=torch.bool, device=tokens.device)
            return MediaCache(tokens, mask)
        latents = self.resample(features)  # [I, N, Dv] -> [I, L, Dv]
        per_row = (input_ids == image_token_id).sum(1)  # [B]
        most = int(per_row.max())
        tokens = latents.new_zeros(batch, most, *latents.shape[1:])  # [B, M, L, Dv]
        slot = torch.arange(most, device=per_row.device)[None] < per_row[:, None]  # [B, M]
        tokens[slot] = latents
        mask = media_attention_mask(
            input_ids, image_token_id, latents.shape[1], self.media_reset_token_id
        )  # [B, T, M·L]
        return MediaCache(tokens.flatten(1, 2), mask)

    def before_block(self, media: MediaCache) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Return the hook DecoderLM runs before each layer: the gated block of that layer, if it has one."""

        def apply(layer: int, x: torch.Tensor) -> torch.Tensor:
            if str(layer) not in self.blocks:
                return x
            cache = None
            if media.keys_values is not None:
                cache = media.keys_values.setdefault(layer, KVCache())
            return self.blocks[str(layer)](x, media.tokens.to(x.dtype), media.mask_for(x.shape[1]), cache)

        return apply


def gated_cross_attention_layers(lm_layers: int, every: int) -> int:
    """Return how many gated cross-attention blocks a Flamingo LM has: one before layers 0, n, 2n, ..."""
    return len(range(0, lm_layers, every))


def gated_cross_attention_flops(queries: int, media: int, lm: LMSizes, media_dim: int) -> int:
    """Return one GATED XATTN-DENSE block's FLOPs as mmlm builds it (Idefics' layout): LM tokens attend to the
    media with the LM's heads, then a SwiGLU MLP of the LM's hidden size."""
    attention = cross_attention_flops(queries, media, lm.width, media_dim, lm.heads, lm.head_dim)
    return attention + mlp_flops(queries, lm.width, lm.mlp_dim, gated=True)


class FlamingoStyle(FusionStyle):
    """`connector.kind` cross_attention: one marker slot per image, the media read by gated blocks in the LM.

    The media mask is tied to the prompt's positions, so the server neither merges nor trims its rows.
    """

    kind = "cross_attention"
    batchable = False
    comparison = {"num_queries": 64}  # L = 64 latents, as the MULTIMODAL_LLMS chapter's table

    def build(self, cfg: ConnectorConfig, vision_dim: int, lm: LMShape) -> FlamingoFusion:
        """Return the resampler, marker and gated blocks for an LM of `lm`'s sizes (an LMConfig)."""
        return FlamingoFusion(cfg, vision_dim, lm)

    def check_video(self, cfg: ConnectorConfig, video_pool: int, video_merge: str) -> None:
        """Raise InputError for more than one frame per slot: each frame goes through the resampler."""
        if video_pool > 1:
            raise InputError(
                "video_pool: cross-attention fusion reads every frame through its own resampler; use 1"
            )
        super().check_video(cfg, video_pool, video_merge)

    def slot_tokens(self, module: nn.Module, features: torch.Tensor, lm: nn.Module) -> torch.Tensor:
        """Return the learned marker of each image, [I, 1, D_lm]."""
        return module.markers(len(features), lm)

    def media(
        self, module: nn.Module, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor | None
    ) -> MediaCache:
        """Return the resampled media and media mask of the batch (an empty one for text only)."""
        return module.media(input_ids, image_token_id, features)

    def before_block(self, module: nn.Module, media: MediaCache) -> BeforeBlock:
        """Return the gated blocks' hook over `media`."""
        return module.before_block(media)

    def generation_cache(self, media: MediaCache) -> MediaCache:
        """Return the media with an empty key/value cache per gated block, computed once when decoding starts."""
        return media.for_generation()

    def connector_work(self, module: nn.Module, features: torch.Tensor, fill: Callable[[], Any]) -> Any:
        """Return the resampler's latents: the markers cost nothing, the resampler is the connector's work."""
        return module.resample(features)

    def cost(self, cfg: ConnectorConfig, x: FusionInput) -> FusionCost:
        """Flamingo: one <image> marker in the sequence; every gated block before every n-th LM layer lets the
        marker and the text attend to the L latents of each view, whose keys/values it caches."""
        per_view = cfg.num_queries if cfg.resampler else x.features * x.frames  # without: the tower's tokens
        media = per_view * x.views
        gated = gated_cross_attention_layers(x.lm.layers, cfg.cross_attn_every_n_layers)
        queries = 1 + x.text_tokens
        resampler = (
            perceiver_resampler_flops(x.features * x.frames, x.vision_dim, cfg) if cfg.resampler else 0
        )
        return FusionCost(
            f"cross_attention {f'L={cfg.num_queries}' if cfg.resampler else f'N={per_view}'} "
            f"every {cfg.cross_attn_every_n_layers}", 1,
            connector_flops=resampler * x.views,
            media_tokens=media,
            lm_extra_flops=gated * gated_cross_attention_flops(queries, media, x.lm, x.vision_dim),
            kv_extra_bytes=kv_cache_bytes(gated, x.lm.heads, x.lm.head_dim, media, x.dtype_bytes),
        )  # fmt: skip
