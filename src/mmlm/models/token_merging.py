"""Token Merging (ToMe; Bolya et al. 2023, "Token Merging: Your ViT but Faster"): fewer ViT tokens per layer.

Each block merges `r` pairs of similar tokens between its attention and its MLP (paper §3, Fig. 1):
  1. bipartite soft matching: alternate the tokens into sets A (even positions) and B (odd), join each A token
     to its most similar B token by cosine similarity of the attention *keys* (averaged over heads; the
     paper's Table 1a finds keys best), and keep the r most similar edges;
  2. each kept edge's A token is merged into its B token by a size-weighted average, x_b ← (s_a·x_a +
     s_b·x_b) / (s_a + s_b), and the sizes add, s_b ← s_a + s_b;
  3. proportional attention: the next attention adds log s to the logits of every key, softmax(q·kᵀ/√d +
     log s), so a merged token weighs as the s tokens it stands for.
The class token is protected: it is never merged away and stays first. A layer merges at most half of its
mergeable tokens (bipartite matching pairs each A token with one B token), so at least one patch token always
remains and `merged_token_counts` gives the exact count after each layer.

The keys come out of `Attention` through a `KVCache` passed in for that one call, so ToMe runs the model's
own attention (no second implementation). Training-free: the weights are those of the unmerged ViT.
"""

import math
from collections.abc import Callable

import torch

from mmlm.layers import Block, KVCache

Merge = Callable[[torch.Tensor], torch.Tensor]  # [B, T, C] -> [B, T − r, C], summing merged tokens


def merges_at(tokens: int, r: int, protected: int) -> int:
    """Return how many tokens a layer with `tokens` tokens, `protected` of them unmergeable, merges for r."""
    return max(0, min(r, (tokens - protected) // 2))


def merged_token_counts(tokens: int, layers: int, r: int, class_token: bool) -> list[int]:
    """Return the token count after each of `layers` ToMe blocks that start from `tokens` tokens."""
    counts = []
    for _ in range(layers):
        tokens -= merges_at(tokens, r, int(class_token))
        counts.append(tokens)
    return counts


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool) -> tuple[Merge, int]:
    """Return (merge function, merges r') from the similarity `metric` [B, T, C] (ToMe Algorithm 1)."""
    r = merges_at(metric.shape[1], r, int(class_token))
    if r == 0:
        return (lambda x: x), 0
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # [B, ⌈T/2⌉, C], [B, ⌊T/2⌋, C]
        scores = a @ b.transpose(-1, -2)  # cosine similarity of every A–B pair, [B, |A|, |B|]
        if class_token:
            scores[:, 0] = -math.inf  # the class token (position 0, in A) is never merged
        best, partner = scores.max(dim=-1)  # each A token's most similar B token
        order = best.argsort(dim=-1, descending=True)[..., None]  # [B, |A|, 1]
        kept, merged = order[:, r:], order[:, :r]  # A tokens left alone; the r most similar edges
        if class_token:
            kept = kept.sort(dim=1).values  # keep the original order, so the class token stays first
        into = partner[..., None].gather(dim=1, index=merged)  # the B token each merged A token joins

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t, c = src.shape
        alone = src.gather(dim=1, index=kept.expand(n, t - r, c))
        moving = src.gather(dim=1, index=merged.expand(n, r, c))
        dst = dst.scatter_reduce(1, into.expand(n, r, c), moving, reduce="sum")
        return torch.cat([alone, dst], dim=1)  # [B, T − r, C]: unmerged A tokens, then every B token

    return merge, r


def merge_weighted_average(
    merge: Merge, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (merged tokens, their sizes): x_b ← Σ s·x / Σ s over the tokens merged into b, sizes summed."""
    size = torch.ones_like(x[..., :1]) if size is None else size  # [B, T, 1]
    total = merge(size)
    return merge(x * size) / total, total


def proportional_attention_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Return the additive attention bias log s for every key, [B, T, 1] -> [B, 1, 1, T] (None: all sizes 1)."""
    return None if size is None else size.log().to(dtype)[:, None, None, :, 0]


def merge_block(
    block: Block, x: torch.Tensor, size: torch.Tensor | None, r: int, class_token: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (tokens, sizes) after one pre-norm ViT block with ToMe between its attention and its MLP.

    [B, T, D] -> [B, T − r', D] with r' = merges_at(T, r, class_token); sizes [B, T − r', 1] count the
    original patches each token stands for (None until the first merge).
    """
    cache = KVCache()  # receives this call's keys, [B, heads, T, head_dim]: the matching metric
    bias = proportional_attention_bias(size, x.dtype)
    x = x + block.attn(block.norm1(x), mask=bias, cache=cache)
    merge, merged = bipartite_soft_matching(cache.k.mean(dim=1), r, class_token)
    if merged:
        x, size = merge_weighted_average(merge, x, size)
    return x + block.mlp(block.norm2(x)), size


def merge_blocks(
    blocks: list[Block], x: torch.Tensor, r: int, class_token: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (output, hidden states) of `blocks` with ToMe; states[0] is the input, [i] block i's output."""
    states, size = [x], None
    for block in blocks:
        x, size = merge_block(block, x, size, r, class_token)
        states.append(x)
    return x, states
