"""Flamingo's gated cross-attention dense block, inserted between frozen LM layers, and its media mask.

Flamingo §2.2 and Fig. 4: x = x + tanh(α_xattn)·CrossAttn(x, media); x = x + tanh(α_dense)·FFW(x), with α = 0 at
init so the LM starts exactly as it was. A text token attends only to the visual tokens of the most recent
`<image>` at or before it (App. A.1.3), which `media_attention_mask` builds from the token ids.

The layout follows transformers' `IdeficsGatedCrossAttentionLayer` (pre-RMSNorms, bias-free attention with
q from the text and k, v from the media, optional per-head RMSNorm on q and k, a SwiGLU MLP, a scalar or
per-channel α) so its weights map one to one (`checkpoints/hf_idefics.py`). Flamingo itself uses LayerNorm and a
GELU MLP here; Idefics, our parity reference, uses RMSNorm and SwiGLU like its Llama LM.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.layers import Attention, GatedMLP, RMSNorm
from mmlm.layers.attention import KVCache
from mmlm.layers.init import initialise, normal_init


def media_attention_mask(
    input_ids: torch.Tensor, media_token_id: int, num_media_tokens: int, reset_token_id: int | None = None
) -> torch.Tensor:
    """Return bool [B, T, M·num_media_tokens]: True where text token t may see a media slot (M = most images in a row).

    Row b's i-th image (counted in order along the row) owns slots i·n .. (i+1)·n - 1 of the media tensor. Token t
    sees exactly the slots of the latest `<image>` at or before t; tokens before a row's first image see none, and
    so do tokens after a `reset_token_id` with no image since (IdeficsProcessor: a document ends at eos).
    """
    is_media = input_ids == media_token_id  # [B, T]
    latest = is_media.long().cumsum(-1) - 1  # [B, T]: index of the latest image so far, -1 before the first
    if reset_token_id is not None:
        position = torch.arange(input_ids.shape[-1], device=input_ids.device)
        last_image = torch.where(is_media, position, -1).cummax(-1).values  # [B, T]
        last_reset = torch.where(input_ids == reset_token_id, position, -1).cummax(-1).values
        reset_before = F.pad(last_reset[..., :-1], (1, 0), value=-1)  # a reset strictly before t
        latest = latest.masked_fill(reset_before > last_image, -1)
    images = int(is_media.sum(-1).max()) if input_ids.numel() else 0
    slot_image = torch.arange(images * num_media_tokens, device=input_ids.device) // num_media_tokens  # [M·n]
    return latest[..., None] == slot_image  # [B, T, 1] == [M·n] -> [B, T, M·n]


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense block: text [B, T, D] reads media [B, S, Dm]; the identity while α = 0."""

    def __init__(
        self,
        dim: int,
        media_dim: int,
        heads: int,
        head_dim: int,
        mlp_dim: int,
        act: str = "silu",
        alpha_type: str = "float",
        qk_norm: bool = False,
        eps: float = 1e-6,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if alpha_type not in ("float", "vector"):
            raise ValueError(
                f"alpha_type: got {alpha_type!r}; expected 'float' (one α) or 'vector' (one per channel)"
            )
        self.attn_norm = RMSNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, head_dim=head_dim, bias=False, cross=True, context_dim=media_dim,
                              qk_norm="rms" if qk_norm else None, qk_norm_eps=eps)  # fmt: skip
        self.mlp_norm = RMSNorm(dim, eps=eps)
        self.mlp = GatedMLP(dim, mlp_dim, act=act, bias=False)
        shape = (1,) if alpha_type == "float" else (dim,)
        self.alpha_attn = nn.Parameter(
            torch.zeros(shape)
        )  # Flamingo: tanh(0) = 0, the block starts as identity
        self.alpha_mlp = nn.Parameter(torch.zeros(shape))
        # Idefics' `_init_weights`: Linear N(0, initializer_range²), RMSNorms 1; the gates keep α = 0
        initialise(self, lambda m: normal_init(m, init_std))

    def cross_attention(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Return the ungated cross-attention output [B, T, D]: exactly 0 for tokens whose mask row sees no media.

        With `cache`, the media's keys/values are computed on the first call and reused after it (decoding).
        """
        if media.shape[1] == 0:  # no image anywhere in the batch
            return torch.zeros_like(x)
        h = self.attn_norm(x)
        if mask is None:
            return self.attn(h, media, cache=cache)
        sees_media = mask.any(dim=-1, keepdim=True)  # [B, T, 1]
        # A fully masked row would softmax over nothing (NaN on some backends). Let it see every slot, then zero
        # its output, as Idefics does with its cross_attention_gate.
        attend = mask | ~sees_media  # [B, T, S]
        y = self.attn(h, media, mask=attend[:, None], cache=cache)  # mask [B, 1, T, S] broadcast over heads
        return y.masked_fill(~sees_media, 0.0)

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Return text states [B, T, D] after attending to media [B, S, Dm]; `mask` bool [B, T, S], True = may see."""
        x = x + torch.tanh(self.alpha_attn) * self.cross_attention(x, media, mask, cache)
        return x + torch.tanh(self.alpha_mlp) * self.mlp(self.mlp_norm(x))
