"""The CLIP / SigLIP text transformer: tokens -> blocks -> pooled at the end token (or last position)."""

from dataclasses import dataclass

import torch
from torch import nn

from mmlm.layers import Transformer
from mmlm.layers.init import initialise, normal_linear, open_clip_transformer_init
from mmlm.models.config import CONFIG_VERSION


@dataclass
class TextConfig:
    """A text transformer: token + learned position embeddings, blocks, final norm, pooling, projection."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "gelu"  # open_clip's for its own from-scratch configs; loaders set OpenAI CLIP's quick_gelu
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP's text tower is causal; SigLIP's is bidirectional
    pool: str = "eos"  # eos (first end token) | eos_argmax (highest id; old CLIP configs) | last (SigLIP)
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    padding: str = "longest"  # how the tokenizer pads: longest (CLIP) | max_length (SigLIP)
    # padding tokens hidden from attention, as transformers does when the tokenizer returns an attention mask
    # (SigLIP 2's Gemma tokenizer does; SigLIP's tokenizer_config.json asks for input_ids alone)
    mask_padding: bool = False
    embed_dim: int | None = 512
    proj_bias: bool = False
    version: int = CONFIG_VERSION


class TextTransformer(nn.Module):
    """Text encoder; CLIP's is causal and pools at the end-of-text token, SigLIP's is bidirectional and pools last."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(
            cfg.layers, dim=cfg.width, heads=cfg.heads, mlp_dim=cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps
        )
        self.norm_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=cfg.proj_bias) if cfg.embed_dim else None
        initialise(self, init_text_tower)

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Return the position pooled in each sequence [B]."""
        if self.cfg.pool == "eos_argmax":  # old CLIP configs: the end token has the highest id
            return ids.argmax(-1)
        if self.cfg.pool == "eos":
            return (ids == self.cfg.eos_token_id).int().argmax(-1)
        return torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Return the keys each token may attend to, [B, 1, 1, L] (True = a real token), or None without
        `mask_padding`."""
        return (ids != self.cfg.pad_token_id)[:, None, None, :] if self.cfg.mask_padding else None

    def forward_features(
        self, ids: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Return (final-normed token states [B, L, D], per-layer hidden states or None)."""
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        # CLIP pads on the right and pools at the end token, so the causal mask alone hides padding from it.
        x, hidden = self.transformer(
            x, self.padding_mask(ids), is_causal=self.cfg.causal, output_hidden_states=output_hidden_states
        )
        return self.norm_final(x), hidden

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Return the (projected, not normalised) text embedding [B, embed_dim or D] for token ids [B, L]."""
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        x, _ = self.transformer(x, self.padding_mask(ids), is_causal=self.cfg.causal)
        # the final norm is per token, so norming only the pooled one is equal and cheaper
        pooled = self.norm_final(x[torch.arange(ids.shape[0], device=ids.device), self.pool_index(ids)])
        return self.proj(pooled) if self.proj is not None else pooled


def init_text_tower(tower: TextTransformer) -> None:
    """open_clip's `TextTransformer.init_parameters`: tokens N(0, 0.02²), positions N(0, 0.01²), the blocks by
    width and depth (`open_clip_transformer_init`), the projection N(0, width⁻¹)."""
    width = tower.cfg.width
    nn.init.normal_(tower.token_embed.weight, std=0.02)
    nn.init.normal_(tower.pos_embed, std=0.01)
    open_clip_transformer_init(tower.transformer, width)
    nn.init.ones_(tower.norm_final.weight)
    nn.init.zeros_(tower.norm_final.bias)
    if tower.proj is not None:
        normal_linear(tower.proj, width**-0.5)
