"""The transformer block (pre-norm or post-norm, optional cross-attention) and a stack of them."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmlm.layers.attention import Attention, KVCache, StaticKVCache
from mmlm.layers.mlp import MLP, GatedMLP
from mmlm.layers.norm import make_norm


class Block(nn.Module):
    """Self-attention, optional cross-attention, then MLP, each with a residual.

    Pre-norm (ViT, CLIP, Llama): x + f(norm(x)). Post-norm (BERT, the Q-Former): norm(x + f(x)).
    `residual_norm` (Swin v2, Chameleon's swin_norm): x + norm(f(x)), the norm on the branch's output.
    Sandwich (Gemma 2 and 3, `sandwich_norm`): pre-norm with a second norm on each branch's output,
    x + post(f(norm(x))).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        act: str = "gelu",
        norm: str = "layer",
        eps: float = 1e-5,
        prenorm: bool = True,
        bias: bool = True,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        gated_mlp: bool = False,
        cross_attention: bool = False,
        context_dim: int | None = None,
        out_bias: bool | None = None,
        mlp_bias: bool | None = None,
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        residual_norm: bool = False,
        attn_scale: float | None = None,
        sandwich_norm: bool = False,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.residual_norm = residual_norm
        self.norm1 = make_norm(norm, dim, eps)
        # `bias` covers every linear unless out_bias / mlp_bias say otherwise (Qwen2: q, k, v biases only)
        self.attn = Attention(dim, heads, kv_heads=kv_heads, head_dim=head_dim, bias=bias, out_bias=out_bias,
                              qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, scale=attn_scale)  # fmt: skip
        self.sandwich_norm = sandwich_norm
        if sandwich_norm:
            self.post_attn_norm = make_norm(norm, dim, eps)
            self.post_mlp_norm = make_norm(norm, dim, eps)
        if cross_attention:
            self.norm_cross = make_norm(norm, dim, eps)
            self.cross_attn = Attention(
                dim, heads, head_dim=head_dim, bias=bias, cross=True, context_dim=context_dim
            )
        self.norm2 = make_norm(norm, dim, eps)
        mlp_bias = bias if mlp_bias is None else mlp_bias
        self.mlp = GatedMLP(dim, mlp_dim, act, mlp_bias) if gated_mlp else MLP(dim, mlp_dim, act, mlp_bias)

    def _residual(self, x: torch.Tensor, f, norm: nn.Module) -> torch.Tensor:
        if self.residual_norm:
            return x + norm(f(x))
        return x + f(norm(x)) if self.prenorm else norm(x + f(x))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | StaticKVCache | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Return the block output, same shape as `x` [B, L, dim]; `rope` is (cos, sin) for rotary positions."""

        def attend(h: torch.Tensor) -> torch.Tensor:
            h = self.attn(h, mask=mask, is_causal=is_causal, cache=cache, rope=rope)
            return self.post_attn_norm(h) if self.sandwich_norm else h

        x = self._residual(x, attend, self.norm1)
        if context is not None:
            x = self._residual(
                x, lambda h: self.cross_attn(h, context=context, mask=context_mask), self.norm_cross
            )
        mlp = (lambda h: self.post_mlp_norm(self.mlp(h))) if self.sandwich_norm else self.mlp
        return self._residual(x, mlp, self.norm2)


def run_block(block: nn.Module, x: torch.Tensor, checkpointed: bool, **kwargs) -> torch.Tensor:
    """Return block(x, **kwargs); when `checkpointed`, its activations are recomputed in backward, not kept.

    Gradient checkpointing (Chen et al. 2016) trades one more forward per block for activation memory. A block
    that writes a KV cache always runs plainly: recomputing it would append its keys twice.
    """
    if checkpointed and torch.is_grad_enabled() and kwargs.get("cache") is None:
        return checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


def set_grad_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn gradient checkpointing on or off for every block stack in `model` (ViT, text tower, decoder LM)."""
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = enabled


class Transformer(nn.Module):
    """A stack of identical blocks; optionally returns every layer's hidden states."""

    def __init__(self, layers: int, **block_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(**block_kwargs) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        caches: list[KVCache] | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Return (output, hidden states) where hidden_states[0] is the input and [i] the output of block i."""
        hidden = [x] if output_hidden_states else None
        checkpointed = self.grad_checkpointing and self.training
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = run_block(block, x, checkpointed, mask=mask, is_causal=is_causal, cache=cache)
            if hidden is not None:
                hidden.append(x)
        return x, hidden
