"""Contrastive objectives: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss."""

import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Return the symmetric InfoNCE loss (CLIP): mean of image->text and text->image cross-entropy.

    L = ½ [CE(s·X·Yᵀ, I) + CE(s·Y·Xᵀ, I)] with s = exp(logit_scale) = 1/τ and matched pairs on the diagonal.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.T  # [N, N]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Return the pairwise sigmoid loss (SigLIP eq. 1): -1/N Σ_ij log σ(z_ij (t·x_i·y_j + b)), z_ii=1, else -1."""
    logits = logit_scale.exp() * image_emb @ text_emb.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]
