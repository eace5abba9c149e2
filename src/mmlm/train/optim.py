"""AdamW without weight decay on norms, biases, embeddings and the logit scale/bias; warmup + cosine schedule."""

import math

import torch
from torch import nn

from mmlm.train.config import OptimConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Return True for parameters that weight decay should not shrink (gains, biases, embeddings, temperatures)."""
    return (
        param.ndim < 2
        or "embed" in name
        or "class_token" in name
        or "logit_" in name
        or name.endswith("probe")
    )


def fused_adamw(device: torch.device) -> bool | None:
    """Return True where AdamW's fused kernel should run (CUDA: one launch for all parameters), else None
    (PyTorch's default, the foreach implementation)."""
    return True if device.type == "cuda" else None


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """Return AdamW over the trainable parameters, with two groups: decayed and not decayed."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Return the learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_length(cfg: OptimConfig, total_steps: int) -> int:
    """Return the warmup steps of a `total_steps` run: cfg.warmup_steps, at most cfg.max_warmup_fraction of the run.

    A fixed warmup sized for long runs would spend most of a short one below the peak learning rate: on small
    real data at a few CPU-minutes (about 50-200 steps) the 100-step warmup lowered validation recall@10 from
    0.755 to 0.641 (docs/benchmarks.md, "From-scratch CLIP on small real data").
    """
    if cfg.max_warmup_fraction is None:
        return cfg.warmup_steps
    return min(cfg.warmup_steps, max(1, math.ceil(cfg.max_warmup_fraction * total_steps)))


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Return the warmup + cosine LambdaLR for `total_steps` optimiser steps."""
    warmup = warmup_length(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_schedule(s, total_steps, warmup, cfg.min_lr_ratio)
    )


def lock_tower(tower: nn.Module, unlocked_last: int) -> None:
    """Freeze a tower (LiT), all of it (0) or all but its last `unlocked_last` blocks and what follows them."""
    blocks = list(tower.transformer.blocks)
    for p in tower.parameters():
        p.requires_grad = False
    if unlocked_last > 0:
        # the last blocks and every module registered after the blocks (final norm, pooling head, projection);
        # what comes before them is the stem (patch embedding, token embedding, Whisper's convolutions)
        names = [name for name, _ in tower.named_children()]
        after = names[names.index("transformer") + 1 :]
        for module in [*blocks[-unlocked_last:], *(getattr(tower, name) for name in after)]:
            for p in module.parameters():
                p.requires_grad = True
