"""The contrastive training loop: one screen, with checkpointing, logging and evaluation hung off it."""

import dataclasses
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from mmlm.models.dual_encoder import DualEncoder
from mmlm.processing.image import PixelNormalize
from mmlm.progress import Progress
from mmlm.train.accumulation import accumulate_contrastive_gradients
from mmlm.train.checkpoint import (
    checkpoint_folder,
    find_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from mmlm.train.config import TrainConfig
from mmlm.train.distributed import DistInfo, distributed_clip_loss, distributed_siglip_loss
from mmlm.train.loggers import MetricLog
from mmlm.train.optim import build_optimizer, build_scheduler, lock_tower
from mmlm.train.sharding import full_tensor, gather_full_weights, sharded_copy
from mmlm.train.stop_signals import StopSignals


def contrastive_loss(
    family: str,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Return this rank's share of the `family`'s loss (CLIP's InfoNCE or SigLIP's sigmoid) on batch features."""
    if family == "siglip":
        return distributed_siglip_loss(image, text, logit_scale, logit_bias)
    return distributed_clip_loss(image, text, logit_scale)


def resolve_device(name: str) -> torch.device:
    """Return the training device: `auto` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _all_ranks(state: Any, dist: DistInfo) -> list[Any]:
    if dist.world_size == 1:
        return [state]
    states = [None] * dist.world_size
    torch_dist.all_gather_object(states, state)
    return states


def _device_batch(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                  normalize: PixelNormalize | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (inputs, ids) on the device: uint8 pixels normalised there, log-mels as they come."""
    inputs, ids = (t.to(device, non_blocking=True) for t in batch)  # non_blocking: from pinned memory, async
    return (inputs if normalize is None else normalize(inputs, dtype)), ids


def _optimizer_step(cfg: TrainConfig, net: torch.nn.Module, model: DualEncoder, batches: Any,
                    device: torch.device, normalize: PixelNormalize | None, bf16: bool, loss_fn: Callable,
                    opt: Any, sched: Any) -> torch.Tensor:  # fmt: skip
    """Take one optimiser step on cfg.optim.accumulation micro-batches with full-batch negatives; return the loss."""
    dtype = model.logit_scale.dtype
    micro_batches = [
        _device_batch(next(batches), device, normalize, dtype) for _ in range(cfg.optim.accumulation)
    ]
    loss = accumulate_contrastive_gradients(
        net, model, micro_batches, partial(loss_fn, model.cfg.family),
        partial(torch.autocast, device.type, torch.bfloat16, enabled=bf16),
    )  # fmt: skip
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    model.clamp_logit_scale()
    return loss


def _resume(run_dir: Path, which: str, model: DualEncoder, opt: Any, sched: Any, data: Any,
            dist: DistInfo) -> tuple[int, list[dict[str, Any]]]:  # fmt: skip
    """Load checkpoint `which` into the model, optimiser, schedule and data stream; return (step, records)."""
    state = load_training_checkpoint(find_checkpoint(run_dir, which), model, opt)
    sched.load_state_dict(state["scheduler"])
    data.load_state_dict(state["data"][dist.rank])
    return state["step"], state["records"]


def _training_modules(cfg: TrainConfig, model: DualEncoder, dist: DistInfo, device: torch.device,
                      bf16: bool) -> tuple[torch.nn.Module, DualEncoder]:  # fmt: skip
    """Return (the module the step calls, the model the optimiser steps): towers locked and checkpointed as
    configured, then the model as is, DDP-wrapped, or (fsdp) a sharded copy; compiled if so configured."""
    # lock_image locks whichever non-text tower the model has (a ViT, or an audio tower)
    for tower, lock in ((model.media_tower, cfg.lock_image), (model.text, cfg.lock_text)):
        if lock is not None:
            lock_tower(tower, lock)
        tower.transformer.grad_checkpointing = cfg.grad_checkpointing
    if cfg.parallel == "fsdp":
        net = model = sharded_copy(model, device, bf16)
    elif dist.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    if cfg.compile:
        # open_clip compiles the DDP-wrapped model: DDP's graph splitting then keeps its bucketed all-reduces
        # overlapping the backward pass. `model` stays the plain module: checkpoints keep their tensor names.
        net = torch.compile(net, backend=cfg.compile_backend)
    return net, model


def train(
    cfg: TrainConfig,
    model: DualEncoder,
    data: Iterable,
    run_dir: Path,
    resume: str | None = None,
    evaluate: Callable[[DualEncoder, int], dict[str, float]] | None = None,
    export: Callable[[Path], Any] | None = None,
    dist: DistInfo | None = None,
    normalize: PixelNormalize | None = None,
) -> list[dict[str, Any]]:
    """Train `model` for cfg.steps optimiser steps on batches of (pixels or log-mels, ids); return the records.

    Pixels may come as uint8 and are then normalised on the device by `normalize` (the image processor's
    numbers); log-mels and float pixels are used as they come.
    SIGTERM or SIGINT stops it after the step in flight (under DDP: at the next multiple of log_every), with a
    checkpoint, by raising RunStopped.

    Between log steps the host never waits for the device: the copies are non_blocking, the logit-scale clamp
    and gradient clipping stay on the device. The host syncs only at log steps (the loss and logit scale read,
    and under DDP the stop question), at evaluation and at checkpoints.
    """
    dist = dist or DistInfo(0, 0, 1, resolve_device(cfg.device))
    device = dist.device if dist.world_size > 1 else resolve_device(cfg.device)
    # fsdp trains a sharded copy (mmlm.train.sharding); the caller's model waits on the CPU for its weights
    model.to("cpu" if cfg.parallel == "fsdp" else device).train()
    normalize = normalize.to(device) if normalize is not None else None
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    unsharded = model
    net, model = _training_modules(cfg, model, dist, device, bf16)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.steps)
    step, records = _resume(run_dir, resume, model, opt, sched, data, dist) if resume else (0, [])
    loss_fn = (
        torch.compile(contrastive_loss, backend=cfg.compile_backend) if cfg.compile else contrastive_loss
    )
    main = dist.rank == 0
    log = MetricLog(run_dir, cfg.log, dataclasses.asdict(cfg), main)
    batches, progress = iter(data), Progress(cfg.steps, initial=step, desc="train", enabled=main)
    samples_per_step = cfg.batch_size * cfg.optim.accumulation * dist.world_size
    last, stopping = time.perf_counter(), False
    with StopSignals() as stop:
        while step < cfg.steps and not stopping:
            loss = _optimizer_step(cfg, net, model, batches, device, normalize, bf16, loss_fn, opt, sched)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                record = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                          "logit_scale": full_tensor(model.logit_scale).exp().item(),
                          "samples_per_s": cfg.log_every * samples_per_step / (now - last)}  # fmt: skip
                if evaluate and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    gather_full_weights(model, unsharded)  # sharded: the weights back on rank 0
                    if main:
                        record.update(evaluate(unsharded, step))
                        unsharded.train()
                last = time.perf_counter()
                records.append(record)
                log.write(record)
                progress.update(step, {k: record[k] for k in ("loss", "lr", "logit_scale", "samples_per_s")})
            # a stop at the last step lets the run finish; several ranks ask at log steps only
            stopping = step < cfg.steps and stop.requested_at(dist, step, cfg.log_every)
            if stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps):
                data_states = _all_ranks(data.state_dict(), dist)
                training_state = {"scheduler": sched.state_dict(), "data": data_states, "records": records}
                save_training_checkpoint(run_dir, step, model, opt, training_state, export)
    if not stopping:  # sharded: the run's result, the trained weights, in the caller's model on rank 0
        gather_full_weights(model, unsharded)
    progress.close()
    log.close()
    if stopping:
        raise stop.stopped(step, checkpoint_folder(run_dir, step), main)
    return records
