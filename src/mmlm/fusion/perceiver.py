"""Flamingo's Perceiver resampler: L learned latents cross-attend to any number of visual features.

Flamingo §2.1 and App. A.1.1: each layer lets the latents attend to concat(media features, latents), keys and
values from both, queries from the latents, then a feed-forward block, both residual; a final LayerNorm. Video
frames [B, T, N, D] get a learned time embedding per frame and are flattened to T·N features, so the output is
[B, L, D] for any N and T. The layout follows transformers' `IdeficsPerceiverResampler` (pre-LayerNorms on
context and latents, bias-free q/k/v/out, an optional per-head LayerNorm on q and k, a LayerNorm-ReLU MLP), so
its weights map one to one (`checkpoints/hf_idefics.py`); Idefics has no time embedding.
"""

import torch
from torch import nn

from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.layers import MLP, Attention
from mmlm.layers.flops import cross_attention_flops, linear_flops, mlp_flops
from mmlm.layers.init import initialise, normal_init


class PerceiverLayer(nn.Module):
    """One resampler layer: latents += Attn(q=LN(latents), kv=[LN(media), LN(latents)]); latents += MLP(LN(latents))."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, mlp_dim: int, qk_layer_norms: bool, act: str
    ) -> None:
        super().__init__()
        self.context_norm = nn.LayerNorm(dim)
        self.latents_norm = nn.LayerNorm(dim)
        # no biases, as in Perceiver/Flamingo; Idefics' q/k norms are LayerNorms with torch's default eps
        self.attn = Attention(dim, heads, head_dim=head_dim, bias=False, cross=True,
                              qk_norm="layer" if qk_layer_norms else None, qk_norm_eps=1e-5)  # fmt: skip
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, act=act, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Return the updated latents [B, L, D] given media features [B, N, D]."""
        queries = self.latents_norm(latents)
        context = torch.cat([self.context_norm(media), queries], dim=1)  # [B, N + L, D]
        latents = latents + self.attn(queries, context)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler: media [B, N, D] or frames [B, T, N, D] -> latents [B, num_latents, D]."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_latents: int,
        heads: int,
        head_dim: int,
        mlp_dim: int,
        max_frames: int = 0,
        qk_layer_norms: bool = False,
        act: str = "relu",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_latents = num_latents
        self.max_frames = max_frames
        self.latents = nn.Parameter(torch.randn(num_latents, dim))  # [L, D], N(0, 1) as in Idefics
        # Flamingo App. A.1.1: x_f = x_f + time_embeddings, [T, 1, D] broadcast over the N features of a frame
        self.time_embedding = nn.Parameter(0.02 * torch.randn(max_frames, 1, dim)) if max_frames > 0 else None
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, heads, head_dim, mlp_dim, qk_layer_norms, act) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        # Idefics' `_init_weights`: Linear N(0, initializer_range²), norms identity; the latents stay N(0, 1)
        initialise(self, lambda m: normal_init(m, init_std))

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """Return num_latents resampled tokens [B, L, D] for media [B, N, D] or video frames [B, T, N, D]."""
        if media.dim() == 3:
            media = media[:, None]  # [B, N, D] -> [B, 1, N, D]: one frame
        frames = media.shape[1]
        if self.time_embedding is not None:
            if frames > self.max_frames:
                raise ValueError(
                    f"{frames} frames given; the resampler has time embeddings for {self.max_frames}"
                )
            media = media + self.time_embedding[:frames]
        media = media.flatten(1, 2)  # [B, T, N, D] -> [B, T·N, D]
        latents = self.latents.expand(media.shape[0], -1, -1)  # [L, D] -> [B, L, D]
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


class PerceiverConnector(nn.Module):
    """A Perceiver resampler at vision width, then a linear map to LM width (identity when the widths match)."""

    def __init__(
        self,
        resampler: PerceiverResampler,
        vision_dim: int,
        lm_dim: int,
        bias: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.resampler = resampler
        self.proj = nn.Linear(vision_dim, lm_dim, bias=bias) if vision_dim != lm_dim else nn.Identity()
        initialise(self.proj, lambda m: normal_init(m, init_std))

    def num_tokens(self, num_patches: int) -> int:
        """Return the visual tokens this connector emits: num_latents, whatever `num_patches`."""
        return self.resampler.num_latents

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [B, N, Dv] or [B, T, N, Dv] -> [B, num_latents, D_lm]."""
        return self.proj(self.resampler(features))


def perceiver_resampler_flops(media: int, vision_dim: int, c: ConnectorConfig) -> int:
    """Return Flamingo's Perceiver Resampler FLOPs: L latents through `depth` blocks, each latent attending
    to the media tokens and the latents (Flamingo: keys = concat(media, latents)), then an MLP."""
    latents = c.num_queries
    heads, head_dim = c.heads, c.head_dim or vision_dim // c.heads
    per_block = cross_attention_flops(latents, media + latents, vision_dim, vision_dim, heads, head_dim)
    per_block += mlp_flops(latents, vision_dim, c.mlp_dim or 4 * vision_dim)
    return c.depth * per_block


def perceiver_cost(c: ConnectorConfig, x: FusionInput) -> FusionCost:
    """A Perceiver Resampler as connector: L latents per view, its frames read together, then projected."""
    per_view = perceiver_resampler_flops(x.features * x.frames, x.vision_dim, c)
    per_view += linear_flops(c.num_queries, x.vision_dim, x.lm.width)
    return FusionCost(f"perceiver L={c.num_queries}", c.num_queries * x.views, per_view * x.views)
