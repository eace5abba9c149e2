"""Multi-head attention on F.scaled_dot_product_attention: self or cross, causal or not, grouped KV heads,
rotary positions, a KV cache (growing, preallocated, or of fixed shape: layers/fixed_cache.py). Projections are
plain nn.Linear modules so LoRA can wrap them."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.layers.fixed_cache import FixedKVCache
from mmlm.layers.linear import project
from mmlm.layers.norm import HeadwiseLayerNorm, make_norm
from mmlm.layers.rotary import apply_rotary


@dataclass
class KVCache:
    """Keys and values of one attention layer seen so far, [B, kv_heads, T, head_dim] each; owned by the caller."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Return the number of cached positions."""
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values along time and return everything cached so far."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (e.g. the sequences still being generated)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


@dataclass
class StaticKVCache:
    """Preallocated keys and values [B, kv_heads, max_length, head_dim]; new ones are written in place.

    Equivalent to KVCache, without re-copying the whole cache on every step (torch.cat) and with fixed
    buffer shapes. `length` counts the positions written so far; attention sees the first `length`.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(
        cls,
        batch: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "StaticKVCache":
        """Return an empty cache with room for `max_length` positions."""
        shape = (batch, kv_heads, max_length, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )

    @property
    def max_length(self) -> int:
        """Return the number of positions the buffers hold."""
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at the next free positions and return views of everything written so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"static KV cache holds {self.max_length} positions; {end} requested")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows`."""
        self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    """Scaled dot-product attention, softmax(q·kᵀ/√d)·v, with `heads` query heads and `kv_heads` key/value heads.

    Self-attention projects q, k, v with one fused `qkv` linear; cross-attention (`cross=True`) projects q from
    the sequence with `q` and k, v from the context with `kv`. `qk_norm` ("layer" or "rms") normalises each head's
    queries and keys over head_dim with `q_norm`/`k_norm` before the dot product (and before rotary positions);
    "layer_per_head" gives each head its own LayerNorm weight and bias (Chameleon; self-attention only).
    `scale` replaces 1/√d where the model says so (Gemma's query_pre_attn_scalar).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        cross: bool = False,
        context_dim: int | None = None,
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.scale = scale  # None: 1/√head_dim; Gemma: query_pre_attn_scalar^-1/2
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.head_dim = head_dim or dim // heads
        self.cross = cross
        q_dim, kv_dim = heads * self.head_dim, self.kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(dim, q_dim, bias=bias)
            self.kv = nn.Linear(context_dim or dim, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, q_dim + 2 * kv_dim, bias=bias)
        self.out = nn.Linear(q_dim, dim, bias=bias if out_bias is None else out_bias)
        self.qk_norm = qk_norm is not None
        if qk_norm == "layer_per_head":
            if cross:
                raise ValueError("qk_norm 'layer_per_head' is for self-attention only")
            self.q_norm = HeadwiseLayerNorm(heads, self.head_dim, qk_norm_eps)
            self.k_norm = HeadwiseLayerNorm(self.kv_heads, self.head_dim, qk_norm_eps)
        elif qk_norm is not None:
            self.q_norm = make_norm(qk_norm, self.head_dim, qk_norm_eps)
            self.k_norm = make_norm(qk_norm, self.head_dim, qk_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        # [B, L, n·hd] -> [B, n, L, hd]
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | StaticKVCache | FixedKVCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Return attention outputs [B, L, dim] for queries `x` [B, L, dim].

        `mask` is boolean (True = may attend) or additive, broadcastable to [B, heads, L, S]. With `cache`,
        the new keys/values are appended to it and the queries attend to all cached positions; in
        cross-attention the context's keys/values are computed once, on the first call, and read from `cache`
        after that (the context must not change between calls). `rope` is
        (cos, signed sin) [B, L, 1, head_dim] from `rotary.rope_cos_sin`, applied to queries and keys (self-attention).
        """
        kv_dim = self.kv_heads * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.heads)
            if self.qk_norm:
                q = self.q_norm(q)
            if cache is not None and cache.length:
                k, v = cache.k, cache.v
            else:
                k, v = self.kv(context).split([kv_dim, kv_dim], dim=-1)
                k, v = self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)
                if self.qk_norm:
                    k = self.k_norm(k)
                if cache is not None:
                    cache.append(k, v)
        else:
            # [B, L, (H + 2·KV)·hd] -> [B, L, H + 2·KV, hd]: queries and keys rotate together in one pass
            qkv = project(self.qkv, x).unflatten(-1, (self.heads + 2 * self.kv_heads, self.head_dim))
            qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=2)
            if self.qk_norm:
                q, k = qk.split([self.heads, self.kv_heads], dim=2)
                qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
            if rope is not None:
                qk = apply_rotary(qk, *rope)
            q, k = qk.split([self.heads, self.kv_heads], dim=2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, n, L, hd]
            if cache is not None:
                k, v = cache.append(k, v)
        if is_causal and (mask is not None or k.shape[2] != q.shape[2]):
            # SDPA's is_causal aligns the triangle top-left; with a cache the queries are the last L positions.
            causal = causal_mask(q.shape[2], k.shape[2], x.device)
            mask = causal if mask is None else causal & mask
            is_causal = False
        is_causal = is_causal and q.shape[2] > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.kv_heads != self.heads,
        )
        return project(self.out, y.transpose(1, 2).flatten(2))  # [B, H, L, hd] -> [B, L, H·hd] -> [B, L, dim]


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Return a [L, S] boolean mask where query i (the last L of S positions) sees keys up to its own position."""
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)
