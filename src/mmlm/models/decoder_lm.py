"""The decoder-only language model of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): token embedding,
pre-norm blocks of RMSNorm + rotary GQA attention + SwiGLU MLP, final RMSNorm, LM head.

Options cover OPT (Zhang et al. 2022, BLIP-2's LM) in the same model: `positions="learned"` adds a learned
position table (OPT's ids are offset by `position_offset` = 2) to the token embeddings instead of rotating q and k,
`norm="layer"` uses LayerNorm, `gated_mlp=False` the two-matrix MLP (ReLU), and the bias flags biased projections.
Gemma 3 is the same stack with options set: embeddings scaled by √width, RMSNorm with scale (1 + w), a norm
on each branch's output too (sandwich), GeGLU, per-head q/k norms, attention scaled by query_pre_attn_scalar^-1/2,
sliding-window layers with their own rotary base, tanh soft-capped logits, and image tokens of one image that
attend to each other both ways (`image_blocks`).

The model holds weights only. Caches are created by `new_cache`, passed in, filled in place and returned.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.layers.attention import KVCache, StaticKVCache
from mmlm.layers.fixed_cache import FixedDecodeCache
from mmlm.layers.init import initialise, normal_init
from mmlm.layers.linear import decodes_by_rows, project, rows_times_matrix
from mmlm.layers.norm import make_norm
from mmlm.layers.rotary import rope_cos_sin, rope_frequencies
from mmlm.layers.transformer import Block, run_block
from mmlm.models.config import CONFIG_VERSION

LayerCache = KVCache | StaticKVCache


@dataclass
class LMConfig:
    """A Llama-family decoder: sizes, rotary positions, biases, sliding window and special token ids."""

    vocab_size: int = 32000
    width: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32  # fewer than heads: grouped-query attention
    head_dim: int | None = None  # None: width // heads
    mlp_dim: int = 11008
    act: str = "silu"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    # M-RoPE (Qwen2-VL): rotary frequencies per (temporal, height, width) position axis; None: one axis
    mrope_section: list[int] | None = None
    max_positions: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q, k, v projections have biases
    out_bias: bool = False  # Llama's attention_bias also puts one on the output projection
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` positions only
    sliding_layers: list[int] | None = None  # layers that use the window; None: all of them
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # std of every fresh Linear and Embedding (transformers' LlamaConfig)
    # per-head norm on queries and keys before rotary positions: "layer_per_head" (Chameleon: a LayerNorm per head)
    # or a norm kind shared by the heads ("rms_offset": Gemma 3)
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-5
    swin_norm: bool = False  # Chameleon-30B: x + norm(f(x)) in each block instead of x + f(norm(x))
    norm: str = "rms"  # rms (Llama) | rms_offset (Gemma: scale 1 + w) | layer (OPT: LayerNorm with a bias)
    gated_mlp: bool = True  # SwiGLU (Llama); False: fc2(act(fc1(x))) (OPT)
    positions: str = "rope"  # rope (rotary q, k) | learned (OPT: a table added to the token embeddings)
    position_offset: int = 0  # learned: row of position 0 in the table (OPT: 2, a fairseq relic)
    # Gemma 3 options; the defaults are Llama's
    embed_scale: bool = False  # multiply token embeddings by √width (rounded to the weights' dtype, as Gemma)
    sandwich_norm: bool = False  # a norm on each block branch's output as well (Gemma 2, 3)
    query_pre_attn_scalar: float | None = None  # attention scale s^-1/2 instead of head_dim^-1/2 (Gemma)
    local_rope_theta: float | None = (
        None  # rotary base of the sliding-window layers (Gemma 3: 10000); None: same
    )
    final_logit_softcap: float | None = None  # logits -> c·tanh(logits / c) (Gemma 2, Gemma 3's text-only LM)
    version: int = CONFIG_VERSION

    @property
    def dim_per_head(self) -> int:
        """Return the size of one attention head."""
        return self.head_dim or self.width // self.heads

    def window(self, layer: int) -> int | None:
        """Return the sliding window of `layer`, or None for full causal attention."""
        if self.sliding_window is None or (
            self.sliding_layers is not None and layer not in self.sliding_layers
        ):
            return None
        return self.sliding_window


class LMOutput(NamedTuple):
    """Logits [B, T, vocab] (T = 1 with `last_only`) and the cache that now holds this call's keys/values."""

    logits: torch.Tensor
    cache: list[LayerCache] | None


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Return position ids [B, length] of the last `length` slots: cumsum(mask) − 1, so left padding is skipped."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)  # padding: any valid position will do
    return positions[:, -length:]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    past: int,
    length: int,
    window: int | None,
    device: torch.device,
    image_blocks: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Return (boolean mask [B or 1, 1, T, S] or None, is_causal) for `length` queries after `past` cached slots.

    Query at slot q may see key slot k when k ≤ q, k > q − window (sliding window) and the key is not padding.
    `image_blocks` [B, T] (this call's slots; -1 for text) lets slots of one image see each other both ways,
    as Gemma 3 does: (causal or same image) and window and not padding. `segment_ids` [B, T] (no cache) numbers
    the samples packed into one row: a slot sees only its own sample's slots, a block-diagonal causal mask.
    """
    total = past + length
    if (
        image_blocks is None
        and attention_mask is None
        and segment_ids is None
        and (window is None or total <= window)
    ):
        if length == 1:
            return None, False  # one query sees every cached key
        if past == 0:
            return None, True  # SDPA's own causal kernel
    query = torch.arange(past, total, device=device)[:, None]  # [T, 1]
    key = torch.arange(total, device=device)[None, :]  # [1, S]
    allowed = key <= query
    if image_blocks is not None:
        blocks = torch.nn.functional.pad(
            image_blocks, (past, 0), value=-1
        )  # [B, S]: cached slots are not images
        same = (blocks[:, None, :] == image_blocks[:, :, None]) & (image_blocks[:, :, None] >= 0)  # [B, T, S]
        allowed = allowed | same
    if segment_ids is not None:  # packed rows: padding is a segment of its own, so no query sees nothing
        allowed = allowed & (segment_ids[:, None, :] == segment_ids[:, :, None])  # [B, T, T]
    if window is not None:
        allowed = allowed & (key > query - window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()  # [B, T, S]
        # A padding query would see no key at all and its softmax would be NaN, which then spreads through
        # its keys/values (0·NaN = NaN); letting it see itself keeps it finite and touches no real token.
        allowed = allowed | (key == query)
    elif allowed.dim() == 2:
        allowed = allowed[None]
    return allowed[:, None], False


def fixed_cache(
    cache: list[LayerCache] | None, *positions_and_masks: torch.Tensor | None
) -> FixedDecodeCache | None:
    """Return `cache` if it is a FixedDecodeCache, else None; raise InputError if positions or masks are given
    with one, since it sets them itself."""
    if not isinstance(cache, FixedDecodeCache):
        return None
    if any(x is not None for x in positions_and_masks):
        raise InputError(
            "DecoderLM: a fixed-shape cache sets positions and masks; position_ids, image_blocks and "
            "segment_ids do not apply"
        )
    return cache


class DecoderLM(nn.Module):
    """Causal LM: logits = head(norm(blocks(embed(ids)))), with rotary positions and an optional KV cache."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if cfg.positions not in ("rope", "learned"):
            raise InputError(f"positions: expected 'rope' or 'learned', got {cfg.positions!r}")
        if cfg.norm not in ("rms", "rms_offset", "layer"):
            raise InputError(f"norm: expected 'rms', 'rms_offset' or 'layer', got {cfg.norm!r}")
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        if cfg.positions == "learned":  # [max_positions + offset, width]
            self.pos_embed = nn.Embedding(cfg.max_positions + cfg.position_offset, cfg.width)
        scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_dim, act=cfg.act, norm=cfg.norm, eps=cfg.norm_eps,
                  bias=cfg.qkv_bias, out_bias=cfg.out_bias, mlp_bias=cfg.mlp_bias, kv_heads=cfg.kv_heads,
                  head_dim=cfg.dim_per_head, gated_mlp=cfg.gated_mlp, qk_norm=cfg.qk_norm,
                  qk_norm_eps=cfg.qk_norm_eps, residual_norm=cfg.swin_norm, attn_scale=scale,
                  sandwich_norm=cfg.sandwich_norm)
            for _ in range(cfg.layers)
        )  # fmt: skip
        self.norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps)
        self.grad_checkpointing = False  # training: recompute each block's activations in backward
        # Tied: the head reuses token_embed.weight (one parameter, so fine-tuning keeps them equal).
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.inv_freq = rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        self.local_inv_freq = self.inv_freq  # Gemma 3: the sliding-window layers rotate at their own base
        if cfg.local_rope_theta is not None:
            self.local_inv_freq = rope_frequencies(cfg.dim_per_head, cfg.local_rope_theta)
        # transformers' Llama `_init_weights`: Linear and Embedding N(0, initializer_range²), biases 0, norms 1.
        # Unlike there, the pad row is not zeroed: our embedding has no padding_idx, so it would train anyway.
        initialise(self, lambda m: normal_init(m, cfg.initializer_range))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return token embeddings [B, T, width] for ids [B, T] (the VLM merges image features into these)."""
        x = self.token_embed(input_ids)
        if self.cfg.embed_scale:
            # Gemma: √width rounded to the weights' dtype first (55.4256 -> 55.5 in bf16), as a Python number
            # so that no host-to-device copy lands in a decode step captured as a CUDA graph
            x = x * float(torch.tensor(self.cfg.width**0.5, dtype=x.dtype))
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return logits [..., vocab] from final hidden states (already normalised), soft-capped if so configured."""
        if self.lm_head is not None:
            logits = project(self.lm_head, hidden)
        else:
            weight = self.token_embed.weight
            if decodes_by_rows(hidden, weight):  # where it pays on this CPU (layers/linear.py)
                logits = rows_times_matrix(hidden, weight)
            else:
                logits = F.linear(hidden, weight)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def prepare_for_inference(self) -> "DecoderLM":
        """Return the model in eval mode with the MLPs' widening projections stored [in, out] in memory.

        Same parameters and values, still seen as [out, in]: only the memory order changes, so modules, names
        and LoRA are untouched. The MLP's linears run through F.linear, and decoding one token makes each a
        matrix-vector product, which MKL on CPU reads ~1.4× faster with the matrix's longer side contiguous
        (gate and up: out > in; down stays). Attention and the head decode through `rows_times_matrix`, which
        wants the usual layout (docs/benchmarks.md). GPU kernels do not care either way.
        """
        for block in self.blocks:
            for m in block.mlp.modules():
                if isinstance(m, nn.Linear) and m.weight.shape[0] > m.weight.shape[1]:
                    m.weight.data = m.weight.data.t().contiguous().t()
        return self.eval()

    def new_cache(
        self,
        batch: int,
        max_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[LayerCache]:
        """Return one empty cache per layer: growing (KVCache), or preallocated for `max_length` positions."""
        if max_length is None:
            return [KVCache() for _ in self.blocks]
        weight = self.token_embed.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        return [
            StaticKVCache.empty(batch, self.cfg.kv_heads, max_length, self.cfg.dim_per_head, device, dtype)
            for _ in self.blocks
        ]

    def new_fixed_cache(self, batch: int, max_length: int) -> FixedDecodeCache:
        """Return an empty FixedDecodeCache of `max_length` slots: the fixed-shape decode of a CUDA graph."""
        if self.cfg.mrope_section is not None:
            raise InputError(
                "cache: the fixed-shape decode cache keeps one position per token, not M-RoPE's three"
            )
        weight = self.token_embed.weight
        cfg = self.cfg
        return FixedDecodeCache.empty(batch, cfg.layers, cfg.kv_heads, max_length, cfg.dim_per_head,
                                      list({self.inv_freq, self.local_inv_freq}), weight.device, weight.dtype)  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        image_blocks: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Return logits for ids [B, T] or embeddings [B, T, width], appending this call's keys/values to `cache`.

        `attention_mask` [B, S] (1 = token, 0 = padding) covers the cached slots and these T, so S = cached + T;
        None means no padding. `position_ids` [B, T] default to cumsum(mask) − 1, or to cached + arange(T);
        with `cfg.mrope_section` they may be [3, B, T] (M-RoPE's temporal, height, width positions).
        `last_only` computes logits for the last position only, which is all decoding needs. `before_block(i, x)`
        runs on the hidden states before layer i (Flamingo's gated cross-attention blocks hang there).
        `image_blocks` [B, T] numbers each image's slots (-1 for text) so they attend both ways (Gemma 3).
        `segment_ids` [B, T] numbers the samples packed into each row (training, no cache): attention stays
        inside a sample; pass `position_ids` restarting at 0 per sample with it.
        A FixedDecodeCache (`new_fixed_cache`) keeps positions and key mask itself: `attention_mask` [B, T] then
        covers this call's T positions only, and attention reads its whole buffers (see layers/fixed_cache.py).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("DecoderLM: pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        fixed = fixed_cache(cache, position_ids, image_blocks, segment_ids)
        past = cache[0].length if cache and fixed is None else 0
        if attention_mask is not None and attention_mask.shape != (batch, past + length):
            raise InputError(
                f"attention_mask: expected shape [{batch}, {past + length}] (cached + new positions), "
                f"got {list(attention_mask.shape)}"
            )
        if fixed is not None:
            position_ids = fixed.write_keys(attention_mask, length)
        elif position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past, past + length, device=x.device).expand(batch, length)
        ropes = None  # per rotary base (Gemma 3's local layers have their own): (cos, sin)
        if self.cfg.positions == "learned":  # OPT: positions enter once, added to the embeddings
            x = x + self.pos_embed(position_ids + self.cfg.position_offset).to(x.dtype)
        else:
            sections = self.cfg.mrope_section
            if sections is not None and position_ids.dim() == 2:
                position_ids = position_ids.expand(3, *position_ids.shape)  # text: one position on every axis
            frequencies = fixed.frequencies if fixed is not None else {}  # on the device already, if given
            freq = frequencies.get(self.inv_freq, self.inv_freq)
            ropes = {self.inv_freq: rope_cos_sin(position_ids, freq, x.dtype, sections)}
        masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}  # one per distinct window
        checkpointed = self.grad_checkpointing and self.training
        for i, block in enumerate(self.blocks):
            window = self.cfg.window(i)
            if window not in masks and fixed is not None:
                masks[window] = fixed.attention_mask(length, window), False
            elif window not in masks:
                masks[window] = build_attention_mask(
                    attention_mask, past, length, window, x.device, image_blocks, segment_ids
                )
            mask, is_causal = masks[window]
            rope = None
            if ropes is not None:
                inv_freq = self.inv_freq if window is None else self.local_inv_freq
                if inv_freq not in ropes:
                    freq = frequencies.get(inv_freq, inv_freq)
                    ropes[inv_freq] = rope_cos_sin(position_ids, freq, x.dtype, sections)
                rope = ropes[inv_freq]
            if before_block is not None:
                x = before_block(i, x)
            x = run_block(block, x, checkpointed, mask=mask, is_causal=is_causal,
                          cache=cache[i] if cache else None, rope=rope)  # fmt: skip
        if fixed is not None:
            fixed.advance(length)
        if last_only:
            x = x[:, -1:]
        return LMOutput(self.head(self.norm(x)), cache)
