"""The VLM training loop (`mmlm train vlm`): LLaVA's stages one after another, in a loop that fits one screen.

Each stage sets what trains before its first step (LLaVA §4.2): stage 1 the connector alone, ViT and LM frozen;
stage 2 the connector with the LM, or with LoRA on the LM's linear layers (merged into the weights when the
stage ends). A stage may unfreeze the ViT's last N blocks from a given step on. Frozen parameters get no
gradient and are not in the optimiser, so they stay bitwise equal. The loss is next-token cross-entropy on
answer tokens, averaged over tokens; it is also logged per modality (`loss_image`, `loss_audio`, `loss_text`).

Batches carry uint8 pixels where the processor allows (`VLMProcessor.with_uint8_pixels`) and are normalised on
the device by `PixelNormalize`, as the CLIP trainer does; NaFlex and Qwen2-VL patches stay float32.

Checkpoints hold the weights, optimiser, schedule, sampler position, RNG state and the stage, so `--resume`
continues exactly; under torchrun every rank trains on its own data stream and DDP averages the gradients, or,
with `parallel: fsdp`, FSDP2 shards weights, gradients and optimiser state over the ranks (mmlm.train.sharding).
"""

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmlm.checkpoints.peft import llama_module_names, save_adapter
from mmlm.data.synthetic.shapes import split_world
from mmlm.errors import InputError
from mmlm.inference.vlm import GenerativeModel
from mmlm.layers.lora import LoRALinear, apply_lora, merge_lora
from mmlm.layers.transformer import set_grad_checkpointing
from mmlm.models.vlm import VisionLanguageModel, causal_lm_loss
from mmlm.processing.image import PixelNormalize
from mmlm.train.checkpoint import (
    checkpoint_folder,
    find_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from mmlm.train.distributed import DistInfo, cleanup, init_distributed
from mmlm.train.loop import _all_ranks, resolve_device
from mmlm.train.mixed_batches import MixedBatches, device_batch, worker_failures_as_errors
from mmlm.train.mixing import corpus_texts, row_modalities, stage_batches
from mmlm.train.optim import build_scheduler, fused_adamw, no_decay
from mmlm.train.plots import plot_modality_losses, plot_training
from mmlm.train.run import run_info
from mmlm.train.sharding import check_launch, gather_full_weights, is_sharded, sharded_copy
from mmlm.train.stop_signals import StopSignals
from mmlm.train.vlm_build import build_tokenizer, build_vlm, patch_feature_sample, shapes_vqa_evaluator
from mmlm.train.vlm_config import LoRAConfig, StageConfig, VLMTrainConfig
from mmlm.train.vlm_metrics import IntervalLosses, RunLog

Evaluate = Callable[[GenerativeModel, int], dict[str, float]]
MEDIA_PARTS = ("model.vision", "model.connector", "model.audio", "model.audio_connector")  # in RowLosses


def unfreeze_vision(model: VisionLanguageModel, layers: int) -> None:
    """Make the last `layers` ViT blocks that feed the connector trainable; all the tower if that is all of them.

    Blocks after the deepest feature layer (the last one, for LLaVA's −2) never reach the loss, so they are not
    counted: with features from block 11 of 12, `layers=2` unfreezes blocks 10 and 11.
    """
    blocks = model.vision.transformer.blocks
    used = max(i % (len(blocks) + 1) for i in model.cfg.feature_layers)  # blocks run for the features
    if layers >= used:
        model.vision.requires_grad_(True)
    else:
        for block in blocks[used - layers : used]:
            block.requires_grad_(True)


def set_trainable(model: VisionLanguageModel, stage: StageConfig, stage_step: int) -> None:
    """Set requires_grad for what `stage` trains at its step `stage_step`; everything else is frozen."""
    model.requires_grad_(False)
    if "connector" in stage.train:
        model.connector.requires_grad_(True)
        if model.cfg.audio is not None:
            model.audio_connector.requires_grad_(True)
    if "audio" in stage.train:
        if model.cfg.audio is None:
            raise InputError("stage trains 'audio', but the model has no audio tower (model.audio)")
        model.audio.requires_grad_(True)
    if "lm" in stage.train:
        model.lm.requires_grad_(True)
    if "lora" in stage.train:
        for module in model.lm.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.requires_grad_(True)
                module.lora_B.requires_grad_(True)
    if stage.vision_layers and stage_step >= stage.vision_from_step:
        unfreeze_vision(model, stage.vision_layers)


def stage_optimizer(
    model: VisionLanguageModel, stage: StageConfig, device: torch.device
) -> torch.optim.AdamW:
    """Return AdamW over every parameter the stage trains at any step (the ViT's blocks before they unfreeze too:
    AdamW skips a parameter without a gradient); no weight decay on gains, biases and embeddings; fused on CUDA."""
    set_trainable(model, stage, stage.steps)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((no_decay(name, p), name.startswith("vision.")), []).append(p)
    if not groups:
        raise InputError(
            f"stage trains {stage.train}, which has no parameters here (unified tokens: train the lm)"
        )
    opt = stage.optim
    param_groups = [
        {"params": params, "weight_decay": 0.0 if plain else opt.weight_decay,
         "lr": opt.lr * (stage.vision_lr_scale if vision else 1.0)}
        for (plain, vision), params in sorted(groups.items())
    ]  # fmt: skip
    return torch.optim.AdamW(
        param_groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=fused_adamw(device)
    )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (summed next-token loss [B], answer tokens [B]) per row; labels of -100 count for nothing."""
    per_token = causal_lm_loss(logits, labels, reduction="none").view(labels.shape[0], -1)  # [B, T-1]
    return per_token.sum(1), (labels[:, 1:] != -100).sum(1)


def length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Return row indices in one or two groups by length, split where the padded token count is least.

    A few long rows (captions) would otherwise pad every short row (one-word answers) to their length.
    """
    order = lengths.argsort()
    ranked = lengths[order].tolist()
    n = len(ranked)
    # padded tokens with the k shortest rows in their own group: k·len[k-1] + (n-k)·len[n-1]
    # on a tie, the fewest groups: splitting rows of one length would only run the LM twice at half the batch
    _, k = min((k * ranked[k - 1] + (n - k) * ranked[-1], -k) for k in range(1, n + 1))
    k = -k
    return [order[:k], order[k:]] if k < n else [order]


def batch_loss(row_loss: torch.Tensor, row_tokens: torch.Tensor, average: str = "token") -> torch.Tensor:
    """Return the batch's loss from per-row loss sums and answer-token counts [B]: the mean over answer tokens
    (`token`), or the mean of each answering row's own mean (`sample`)."""
    if average == "sample":
        answered = row_tokens > 0  # rows without answer tokens count for nothing
        return (row_loss[answered] / row_tokens[answered]).sum() / answered.sum().clamp(min=1)
    return row_loss.sum() / row_tokens.sum().clamp(min=1)


class RowLosses(nn.Module):
    """The training forward pass: per-row loss sums and answer-token counts of a right-padded batch, or per
    sample of a packed one.

    The ViT and connector run once; the LM runs per length group, each cut to its own longest row. Right
    padding needs no attention mask: causal attention already keeps real tokens off the padding after them.
    Packed rows (mmlm.processing.packing) run as one group, attention kept inside each sample by `segment_ids`.
    """

    def __init__(self, model: VisionLanguageModel, group_by_length: bool = True) -> None:
        super().__init__()
        self.model = model
        self.group_by_length = group_by_length

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        pixels: torch.Tensor | None,
        audio_features: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (summed loss [B], answer tokens [B]) for ids, labels and mask [B, T] and the batch's images
        (and audio clips; `image_sizes` for LLaVA-NeXT's spatial_unpad); packed rows (`segment_ids`,
        `position_ids` and `sample_index` [R, T]) give them per sample, in `sample_index` order."""
        embeds, media = self.model.prepare(input_ids, pixels, audio_features, image_frames, image_sizes)
        if segment_ids is not None:
            row_loss, row_tokens = self.packed(embeds, media, labels, position_ids, segment_ids, sample_index)
            return self.reaching_trained(row_loss), row_tokens
        lengths = attention_mask.sum(1)
        row_loss = torch.zeros(len(input_ids), device=embeds.device)
        row_tokens = torch.zeros(len(input_ids), dtype=torch.long, device=embeds.device)
        for rows in length_groups(lengths.cpu()) if self.group_by_length else [torch.arange(len(lengths))]:
            rows = rows.to(embeds.device)
            length = int(lengths[rows].max())
            group_media = None if media is None else media.take(rows, length)
            logits = self.model.run_lm(embeds[rows, :length], group_media).logits
            loss, tokens = token_losses(logits, labels[rows, :length])
            row_loss, row_tokens = row_loss.index_put((rows,), loss), row_tokens.index_put((rows,), tokens)
        return self.reaching_trained(row_loss), row_tokens

    def reaching_trained(self, row_loss: torch.Tensor) -> torch.Tensor:
        """Return the row losses, tied with weight 0 to the trained parameters when none of them took part (a
        text-only batch in a stage that trains only the connector or tower). Backward then runs as on any
        batch, in step with the other ranks under DDP and FSDP, and gives those parameters zero gradients, as
        an unused path would (AdamW's weight decay still applies to them that step)."""
        if row_loss.requires_grad:  # the usual case: no walk over the parameters
            return row_loss
        trained = [p for p in self.parameters() if p.requires_grad]
        return row_loss + 0 * sum(p.sum() for p in trained) if trained else row_loss

    def packed(
        self,
        embeds: torch.Tensor,
        media: Any,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        sample_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (summed loss [N], answer tokens [N]) per sample of packed rows [R, T]."""
        if media is not None:  # its media are per row: a row holding several samples would mix their images
            raise InputError(f"data.pack: the {self.model.kind!r} fusion style cannot train on packed rows")
        logits = self.model.run_lm(embeds, position_ids=position_ids, segment_ids=segment_ids).logits
        per_token = causal_lm_loss(logits, labels, reduction="none")  # [R·(T-1)]
        targets = sample_index[:, 1:].flatten()  # the sample each predicted token belongs to
        answer = labels[:, 1:].flatten() != -100  # never across samples: each sample's first label is -100
        samples = int(sample_index.max()) + 1
        loss = per_token.new_zeros(samples).index_add(0, targets[answer], per_token[answer])
        return loss, torch.bincount(targets[answer], minlength=samples)


def add_lora(model: VisionLanguageModel, lora: LoRAConfig) -> list[str]:
    """Wrap the LM's target linear layers in LoRA; return their names."""
    return apply_lora(model.lm, lora.rank, lora.alpha, lora.targets, lora.dropout, lora.rslora)


def stage_losses(
    model: VisionLanguageModel, stage: StageConfig, cfg: VLMTrainConfig, device: torch.device, bf16: bool
) -> RowLosses:
    """Return the stage's training forward pass over `model`, or over a sharded copy of it (`parallel: fsdp`).

    Sharded, the LM runs once per batch, and the towers' and connectors' blocks stay in FSDP's root group unless
    every sample has an image: every rank must all-gather the same blocks as often (mmlm.train.sharding)."""
    if cfg.parallel == "ddp":
        return RowLosses(model)
    every_sample_has_an_image = stage.data.multimodal_fraction == 1 and model.cfg.audio is None
    skipped = () if every_sample_has_an_image else MEDIA_PARTS
    return sharded_copy(RowLosses(model, group_by_length=False), device, bf16, skipped)


def _wrap(model: nn.Module, dist: DistInfo, device: torch.device) -> nn.Module:
    if dist.world_size == 1 or is_sharded(model):  # FSDP2 reads requires_grad at each all-gather
        return model
    # a text-only batch leaves the ViT and connector without gradients, hence find_unused_parameters
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def accumulate_gradients(
    net: nn.Module, batches: Iterator[dict[str, Any]], micro_batches: int, device: torch.device, bf16: bool,
    loss_average: str, interval: IntervalLosses, normalize: PixelNormalize | None = None,
) -> None:  # fmt: skip
    """Run `micro_batches` batches forward and backward (gradients add up), their row losses and the time spent
    waiting for them into `interval`."""
    for _ in range(micro_batches):
        asked = time.perf_counter()
        drawn = next(batches)
        interval.data_wait += time.perf_counter() - asked
        batch = device_batch(drawn, device, normalize)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            row_loss, row_tokens = net(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                       batch["pixel_values"], batch["audio_features"],
                                       batch["image_frames"], batch["image_sizes"], batch.get("position_ids"),
                                       batch.get("segment_ids"), batch.get("sample_index"))  # fmt: skip
        loss = batch_loss(row_loss, row_tokens, loss_average)
        (loss / micro_batches).backward()
        interval.add(row_loss.detach(), row_tokens, row_modalities(batch))


def every(interval: int, step: int) -> bool:
    """Return whether `step` is a multiple of `interval` (never, for an interval of 0)."""
    return bool(interval) and step % interval == 0


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, grad_clip: float | None) -> None:
    """Clip the trained parameters' gradients (if `grad_clip`), step the optimiser and schedule, clear gradients."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()


def _resume_stage(checkpoint: Path, state: dict[str, Any], model: nn.Module, opt: Any, sched: Any, data: Any,
                  dist: DistInfo) -> None:  # fmt: skip
    """Load the checkpoint into the stage's model, optimiser (and the RNG state), schedule and data position."""
    load_training_checkpoint(checkpoint, model, opt)
    sched.load_state_dict(state["scheduler"])
    data.load_state_dict(state["data"][dist.rank])


def train_vlm(
    cfg: VLMTrainConfig,
    model: VisionLanguageModel,
    stage_data: Callable[[int, str, StageConfig], MixedBatches],
    run_dir: Path,
    resume: str | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    on_stage_end: Callable[[str, StageConfig], None] | None = None,
    dist: DistInfo | None = None,
    normalize: PixelNormalize | None = None,
) -> list[dict[str, Any]]:
    """Train `model` through cfg.stages in order; return the logged records (one per log_every steps).

    uint8 pixel_values are normalised on the device by `normalize`. SIGTERM or SIGINT stops it after the step
    in flight (several ranks: at the next log step), with a checkpoint, by raising RunStopped.
    """
    dist = dist or DistInfo(0, 0, 1, resolve_device(cfg.device))
    device = dist.device if dist.world_size > 1 else resolve_device(cfg.device)
    model.to("cpu" if cfg.parallel == "fsdp" else device).train()  # fsdp trains a sharded copy per stage
    normalize = normalize.to(device) if normalize is not None else None
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    main = dist.rank == 0
    checkpoint = find_checkpoint(run_dir, resume) if resume else None
    state = torch.load(checkpoint / "training_state.pt", weights_only=False) if checkpoint else None
    step, records = (state["step"], state["records"]) if state else (0, [])
    log, first = RunLog(run_dir, cfg, step, main), 0
    with StopSignals() as stop, worker_failures_as_errors():
        for index, (name, stage) in enumerate(cfg.stages.items()):
            end = first + stage.steps
            if state is not None and index < state["stage"]:
                first = end
                continue  # finished before the checkpoint (a LoRA stage's update is merged in its weights)
            if "lora" in stage.train:
                add_lora(model, cfg.lora)
            losses = stage_losses(model, stage, cfg, device, bf16)
            trained, checkpointed = losses.model, (losses if is_sharded(losses) else model)
            opt, data = stage_optimizer(trained, stage, device), stage_data(index, name, stage)
            sched = build_scheduler(opt, stage.optim, stage.steps)
            if state is not None:  # the stage the checkpoint was written in
                _resume_stage(checkpoint, state, checkpointed, opt, sched, data, dist)
                state = None
            set_trainable(trained, stage, step - first)
            net, batches, interval = _wrap(losses, dist, device), iter(data), IntervalLosses()
            while step < end:
                if stage.vision_layers and step - first == stage.vision_from_step:
                    set_trainable(trained, stage, step - first)
                    net = _wrap(losses, dist, device)  # DDP registers what needs gradients anew
                accumulate_gradients(net, batches, stage.optim.accumulation, device, bf16, cfg.loss_average,
                                     interval, normalize)  # fmt: skip
                optimizer_step(trained, opt, sched, stage.optim.grad_clip)
                step += 1
                if step % cfg.log_every == 0 or step == end:
                    record = {"step": step, "stage": name, **interval.figures(dist.world_size),
                              "lr": sched.get_last_lr()[0],
                              **{f"skipped_{k}": n for k, n in sorted(data.skipped.items())}}  # fmt: skip
                    if evaluate and (step == cfg.total_steps or every(cfg.eval_every, step)):
                        gather_full_weights(losses, RowLosses(model))  # sharded: the weights back on rank 0
                        if main:
                            record.update(evaluate(step))
                            model.train()
                    records.append(record)
                    log.write(record)
                    interval = IntervalLosses()
                stopping = step < cfg.total_steps and stop.requested_at(dist, step, cfg.log_every)
                if stopping or (every(cfg.checkpoint_every, step) and step < cfg.total_steps):
                    training_state = {"stage": index, "scheduler": sched.state_dict(), "records": records,
                                      "data": _all_ranks(data.state_dict(), dist)}  # fmt: skip
                    save_training_checkpoint(run_dir, step, checkpointed, opt, training_state)
                if stopping:  # before the stage's end hooks: the resumed run runs them
                    log.close()
                    raise stop.stopped(step, checkpoint_folder(run_dir, step), main)
            gather_full_weights(losses, RowLosses(model))  # for the adapter, the merge and the export
            if on_stage_end is not None and main:
                on_stage_end(name, stage)
            if "lora" in stage.train:
                merge_lora(model.lm)
            first = end
    log.close()
    return records


# ---- the data and evaluation of a run (its tokenizer and model: mmlm.train.vlm_build) ----


def run_vlm_training(
    cfg: VLMTrainConfig, resume: str | None = None, evaluate: Evaluate | None = None
) -> tuple[GenerativeModel, list[dict[str, Any]]]:
    """Train a VLM as configured; write <out_dir>/model (mmlm.load reads it), metrics.jsonl and plots.

    `evaluate(model, step)` runs every cfg.eval_every steps and at the end; by default, with shapes data,
    VQA accuracy on cfg.eval_samples test questions is reported.
    """
    dist = init_distributed()
    check_launch(cfg.parallel)
    run_dir = Path(cfg.out_dir)
    if resume:
        find_checkpoint(run_dir, resume)  # a missing checkpoint fails now, not after the data is built
    run_dir.mkdir(parents=True, exist_ok=True)
    # every training sample (and the tokenizer's text) keeps off the held-out pairs, words and chart bars
    pairs, _ = split_world(cfg.seed, cfg.holdout_fraction)
    stage_data = [s.data for s in cfg.stages.values()]
    corpus = lambda: corpus_texts(stage_data, cfg.seed, pairs)  # noqa: E731
    if dist.rank == 0:  # one process trains the BPE; the others read it
        build_tokenizer(cfg, run_dir, corpus)
    if dist.world_size > 1:
        torch.distributed.barrier()
    model, processor = build_vlm(cfg, build_tokenizer(cfg, run_dir, corpus))
    loaded = GenerativeModel(model, processor)  # its processor keeps giving float pixels, for inference
    stream_processor = processor.with_uint8_pixels()
    normalize = PixelNormalize(processor.image_processor) if stream_processor.uint8_pixels else None
    if dist.rank == 0:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        (run_dir / "run_info.json").write_text(json.dumps(run_info(), indent=2) + "\n")
    if not resume and dist.rank == 0:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if evaluate is not None:
        hook = lambda step: evaluate(loaded, step)  # noqa: E731
    elif cfg.eval_samples and all(d.source == "shapes" for d in stage_data):
        hook = shapes_vqa_evaluator(loaded, cfg, pairs)
    else:
        hook = None

    def batches(index: int, name: str, stage: StageConfig) -> MixedBatches:
        seed = cfg.seed * 1000 + index  # each stage draws its own order
        return stage_batches(stage.data, stream_processor, cfg.batch_size, seed, pairs, model.cfg.vision.image_size,
                             dist.rank, model.cfg.video_pool, cfg.data.workers, cfg.data.timeout,
                             cfg.data.group_by_length, cfg.data.pack)  # fmt: skip

    def after_stage(name: str, stage: StageConfig) -> None:
        if "lora" in stage.train and cfg.lora.save_adapter:
            save_adapter(
                model, run_dir / f"adapter-{name}", llama_module_names("lm.", "model.language_model.")
            )

    def patch_features(
        images: int,
    ) -> torch.Tensor | None:  # from the first stage with images; None: none has
        multimodal = [i for i, d in enumerate(stage_data) if d.multimodal_fraction > 0]
        if not multimodal:
            return None
        index = multimodal[0]
        return patch_feature_sample(
            model, batches(index, *list(cfg.stages.items())[index]), images, normalize
        )

    # a run that goes on from a VLM (model.vlm_init) keeps its connector as loaded or as initialised
    fresh = not resume and cfg.model.vlm_init is None
    if fresh and (fitted := model.style.initialise(model.connector, patch_features)) is not None:
        print(fitted)
    records = train_vlm(cfg, model, batches, run_dir, resume, hook, after_stage, dist, normalize)
    if dist.rank == 0:
        loaded.save_pretrained(run_dir / "model")
        plot_training(records, run_dir)
        plot_modality_losses(records, run_dir)
    cleanup()
    return loaded, records
