"""Contrastive gradient accumulation with full-batch negatives (open_clip's `accum_freq` algorithm).

A contrastive loss is not a sum over samples: every pair is a negative for every other pair, so K micro-batches
each with its own loss see only n - 1 negatives, not the K·n - 1 of the batch they add up to. Instead:

1. run the K micro-batches forward without gradients and cache their (image, text) features;
2. for each micro-batch k, run it forward again with gradients, put its features in place of the k-th cached
   ones and backpropagate the loss over all K·n pairs: only micro-batch k's features carry a gradient;
3. the caller takes one optimiser step.

Summing the K backward passes gives Σ_k ∂L/∂f_k · ∂f_k/∂θ = ∂L/∂θ, the gradient of the single-batch loss on all
K·n pairs. The logit scale (and SigLIP bias) enter every pass's loss directly, so they take their gradient in the
last pass only; open_clip lets them collect it K times. The cost is K extra no-grad forwards per optimiser
step (about a third more compute than plain accumulation) and K·n cached embeddings.

Dropout: the k-th forward with gradients restores the random state from before the k-th cached forward, so
both see the same dropout masks (open_clip does not; its models have none). Augmentation happens in the data
stream, before either forward, and the cached inputs are reused, so it is identical by construction.
Under DDP each rank's loss sees its K·n local features and gathers the other ranks' the same way, and
gradients are synchronised only on the last backward.
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmlm.models.dual_encoder import DualEncoder

# (image or audio features [N, D], text features [N, D], logit scale, logit bias or None) -> this rank's loss
FeatureLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_random_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _without_gradient(p: torch.Tensor | None, keep: bool) -> torch.Tensor | None:
    return p if p is None or keep else p.detach()


def accumulate_contrastive_gradients(
    net: torch.nn.Module,
    model: DualEncoder,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: FeatureLoss,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """Backpropagate the loss over all micro-batches' pairs, one micro-batch at a time; return that loss.

    `net` is `model` or its DDP wrapper; the gradients land in the parameters' .grad, ready for one step.
    """
    k_total = len(micro_batches)
    device = micro_batches[0][0].device
    states, cached = [], []
    if k_total > 1:
        with torch.no_grad():
            for inputs, ids in micro_batches:
                states.append(_random_state(device))
                with autocast():
                    cached.append(net(inputs, ids))
    for k, (inputs, ids) in enumerate(micro_batches):
        last = k == k_total - 1
        if states:
            _set_random_state(states[k], device)
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast():
                image_k, text_k = net(inputs, ids)  # [n, D] each
                image = torch.cat([c[0] for c in cached[:k]] + [image_k] + [c[0] for c in cached[k + 1 :]])
                text = torch.cat([c[1] for c in cached[:k]] + [text_k] + [c[1] for c in cached[k + 1 :]])
                loss = loss_fn(  # over all K·n pairs: [K·n, D] each
                    image,
                    text,
                    _without_gradient(model.logit_scale, last),
                    _without_gradient(model.logit_bias, last),
                )
            loss.backward()
    return loss.detach()
