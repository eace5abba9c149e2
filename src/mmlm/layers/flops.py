"""The FLOPs of one operation, and the bytes of a key/value cache: the arithmetic every cost in mmlm is built from.

FLOPs = 2 × multiply-accumulates (MACs), forward pass only, matrix products only, as
torch.utils.flop_counter.FlopCounterMode counts them (mmlm/models/budget.py states the full conventions).
"""


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """Return the FLOPs of a linear map applied to `tokens` vectors: 2·tokens·d_in·d_out."""
    return 2 * tokens * d_in * d_out


def attention_score_flops(pairs: int, heads: int, head_dim: int) -> int:
    """Return the FLOPs of q·kᵀ plus A·v over `pairs` query–key pairs: 2 × 2·pairs·heads·head_dim."""
    return 4 * pairs * heads * head_dim


def self_attention_flops(tokens: int, dim: int, heads: int, kv_heads: int, head_dim: int, pairs: int) -> int:
    """Return the FLOPs of a self-attention layer: q, k, v projections, scores, output projection."""
    qkv = linear_flops(tokens, dim, (heads + 2 * kv_heads) * head_dim)
    return qkv + attention_score_flops(pairs, heads, head_dim) + linear_flops(tokens, heads * head_dim, dim)


def cross_attention_flops(
    queries: int, keys: int, dim: int, context_dim: int, heads: int, head_dim: int
) -> int:
    """Return the FLOPs of `queries` tokens (width dim) attending to `keys` context tokens (context_dim)."""
    inner = heads * head_dim
    q, kv = linear_flops(queries, dim, inner), linear_flops(keys, context_dim, 2 * inner)
    return q + kv + attention_score_flops(queries * keys, heads, head_dim) + linear_flops(queries, inner, dim)


def mlp_flops(tokens: int, dim: int, hidden: int, gated: bool = False) -> int:
    """Return the FLOPs of an MLP dim -> hidden -> dim: two matrices, three when gated (SwiGLU)."""
    return (3 if gated else 2) * linear_flops(tokens, dim, hidden)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, dtype_bytes: int) -> int:
    """Return the KV-cache size: 2 (K and V) × layers × kv_heads × head_dim × tokens × bytes per value."""
    return 2 * layers * kv_heads * head_dim * tokens * dtype_bytes
