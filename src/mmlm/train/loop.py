"""The contrastive training loop: one screen, with checkpointing, logging and evaluation hung off it."""

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mmlm.clip import DualEncoder
from mmlm.losses import clip_loss, siglip_loss
from mmlm.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from mmlm.train.config import TrainConfig
from mmlm.train.optim import build_optimizer, build_scheduler, lock_tower
from mmlm.train.progress import Progress


def contrastive_loss(model: DualEncoder, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Return the configured loss (CLIP's InfoNCE or SigLIP's sigmoid) of one batch."""
    image, text = model(pixels, ids)
    if model.cfg.family == "siglip":
        return siglip_loss(image, text, model.logit_scale, model.logit_bias)
    return clip_loss(image, text, model.logit_scale)


def resolve_device(name: str) -> torch.device:
    """Return the training device: `auto` picks CUDA when present."""
    return torch.device(
        "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    )


def train(
    cfg: TrainConfig,
    model: DualEncoder,
    data: Iterable,
    run_dir: Path,
    resume: str | None = None,
    evaluate: Callable[[DualEncoder, int], dict[str, float]] | None = None,
    export: Callable[[Path], None] | None = None,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Train `model` for cfg.steps optimiser steps on batches of (pixels, ids); return the logged records."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    for tower, lock in ((model.visual, cfg.lock_image), (model.text, cfg.lock_text)):
        if lock is not None:
            lock_tower(tower, lock)
        tower.transformer.grad_checkpointing = cfg.grad_checkpointing
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.steps)
    step, records = 0, []
    if resume:
        state = load_checkpoint(find_checkpoint(run_dir, resume), model)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        step, records = state["step"], state["records"]
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    forward = torch.compile(contrastive_loss) if cfg.compile else contrastive_loss
    log = (run_dir / "metrics.jsonl").open("a")
    batches, progress = iter(data), Progress(cfg.steps, initial=step, desc="train")
    last = time.perf_counter()
    while step < cfg.steps:
        for _ in range(cfg.optim.accumulation):
            pixels, ids = next(batches)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                loss = forward(model, pixels.to(device, non_blocking=True), ids.to(device, non_blocking=True))
            (loss / cfg.optim.accumulation).backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        model.clamp_logit_scale()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            rate = cfg.log_every * cfg.batch_size * cfg.optim.accumulation / (now - last)
            last = now
            record = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                      "logit_scale": model.logit_scale.exp().item(), "samples_per_s": rate}  # fmt: skip
            if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                record.update(evaluate(model, step))
                model.train()
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.update(step, {k: record[k] for k in ("loss", "lr", "logit_scale", "samples_per_s")})
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            training_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                              "data": data.state_dict(), "records": records}  # fmt: skip
            save_checkpoint(run_dir, step, model, training_state, export)
        if stop_after is not None and step >= stop_after:
            break
    progress.close()
    log.close()
    return records
