"""The BLIP-2 Q-Former (Li et al. 2023): K learned queries read the frozen image features through cross-attention.

The queries are LayerNorm-ed, then pass through BERT-style post-norm blocks, x ← norm(x + f(x)):
self-attention among the queries (bidirectional, no causal mask), cross-attention to the image features in
every `cross_attention_frequency`-th block (block i has it when i % frequency == 0, as in transformers), and
the feed-forward block. The connector adds `language_projection` to the LM width, so any number N of image
features becomes exactly K visual tokens: [B, N, Dv] -> [B, K, D_lm].

Deliberate deviations from transformers' Blip2QFormerModel, none of which changes an eval-mode output:
- no dropout (transformers drops after the query LayerNorm, after each dense output and in attention);
- the Q-Former runs in its parameters' dtype; transformers pins it to fp32 (`_keep_in_fp32_modules`). Features
  are cast to that dtype, and the Q-Former's output to the projection's dtype, as there.
- only the query path: the text-token FFN (`intermediate`/`output`) of BLIP-2's stage-1 objectives is absent.
"""

import torch
from torch import nn

from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.layers import Block
from mmlm.layers.flops import cross_attention_flops, linear_flops, mlp_flops, self_attention_flops
from mmlm.layers.init import initialise, normal_init

# transformers' Blip2QFormerConfig.layer_norm_eps (BERT's), ConnectorConfig.norm_eps's default
BLIP2_LAYER_NORM_EPS = 1e-12


class QFormer(nn.Module):
    """K learned queries, LayerNorm, then post-norm blocks of self-attention, periodic cross-attention and MLP."""

    def __init__(
        self,
        vision_dim: int,
        num_queries: int = 32,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        cross_attention_frequency: int = 2,
        act: str = "gelu",
        eps: float = BLIP2_LAYER_NORM_EPS,
        bias: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.vision_dim = vision_dim
        self.cross_attention_frequency = cross_attention_frequency
        # LAVIS initialises the queries N(0, initializer_range²) (transformers zeros them, expecting a
        # checkpoint); zeros would make all K queries identical and keep them so under training
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * init_std)  # [1, K, W]
        self.query_norm = nn.LayerNorm(width, eps=eps)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_dim or 4 * width, act=act, norm="layer", eps=eps, prenorm=False, bias=bias,
                  head_dim=head_dim, cross_attention=i % cross_attention_frequency == 0, context_dim=vision_dim)
            for i in range(depth)
        )  # fmt: skip
        # BLIP-2's `_init_weights`: Linear N(0, initializer_range²), biases 0, LayerNorms identity
        initialise(self, lambda m: normal_init(m, init_std))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the queries' final states [B, K, W] for image features [B, N, Dv].

        `mask` [B, N] (True or 1 = a real feature) hides padded features from cross-attention; each row needs
        at least one real feature.
        """
        features = features.to(self.query_tokens.dtype)
        x = self.query_norm(self.query_tokens.expand(features.shape[0], -1, -1))  # [1, K, W] -> [B, K, W]
        context_mask = None if mask is None else mask.bool()[:, None, None, :]  # [B, N] -> [B, 1, 1, N]
        for i, block in enumerate(self.blocks):
            if i % self.cross_attention_frequency == 0:
                x = block(x, context=features, context_mask=context_mask)  # [B, K, W] attends to [B, N, Dv]
            else:
                x = block(x)
        return x


class QFormerConnector(nn.Module):
    """BLIP-2's connector: a Q-Former then `language_projection` to the LM width; always K visual tokens."""

    def __init__(self, qformer: QFormer, lm_dim: int, bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        self.qformer = qformer
        self.language_projection = nn.Linear(qformer.query_tokens.shape[-1], lm_dim, bias=bias)
        initialise(self.language_projection, lambda m: normal_init(m, init_std))

    def num_tokens(self, num_patches: int) -> int:
        """Return K, the number of learned queries, whatever `num_patches`."""
        return self.qformer.num_queries

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return visual tokens in LM width, [B, N, Dv] -> [B, K, D_lm]; `mask` [B, N] marks real features."""
        queries = self.qformer(features, mask)  # [B, N, Dv] -> [B, K, W]
        return self.language_projection(queries.to(self.language_projection.weight.dtype))  # [B, K, D_lm]


def build_qformer_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int) -> QFormerConnector:
    """Return the QFormerConnector `cfg` describes (width None: `vision_dim`; mlp_dim None: 4 × width)."""
    bias = cfg.bias is not False  # BLIP-2 gives every linear a bias
    eps = BLIP2_LAYER_NORM_EPS if cfg.norm_eps is None else cfg.norm_eps
    qformer = QFormer(
        vision_dim, cfg.num_queries, cfg.width or vision_dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.mlp_dim,
        cfg.cross_attention_frequency, act=cfg.act, eps=eps, bias=bias, init_std=cfg.initializer_range,
    )  # fmt: skip
    return QFormerConnector(qformer, lm_dim, bias=bias, init_std=cfg.initializer_range)


def qformer_flops(patches: int, vision_dim: int, lm_dim: int, c: ConnectorConfig) -> int:
    """Return BLIP-2's Q-Former FLOPs: K queries through `depth` blocks, every n-th cross-attending to the
    N patches, then the projection to the LM width."""
    k, width = c.num_queries, c.width or vision_dim
    heads, head_dim = c.heads, c.head_dim or width // c.heads
    flops = 0
    for i in range(c.depth):
        flops += self_attention_flops(k, width, heads, heads, head_dim, k * k)
        if i % c.cross_attention_frequency == 0:  # BLIP-2: blocks 0, n, 2n, ... read the image
            flops += cross_attention_flops(k, patches, width, vision_dim, heads, head_dim)
        flops += mlp_flops(k, width, c.mlp_dim or 4 * width)
    return flops + linear_flops(k, width, lm_dim)


def qformer_cost(c: ConnectorConfig, x: FusionInput) -> FusionCost:
    """BLIP-2: K query tokens per view and frame, whatever the resolution."""
    per_view = x.views * x.slots
    flops = qformer_flops(x.features, x.vision_dim, x.lm.width, c) * per_view
    return FusionCost(f"qformer K={c.num_queries}", c.num_queries * per_view, flops)
