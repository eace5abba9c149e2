"""`mmlm budget --train`: the memory per device of one training step (mmlm/models/train_budget.py)."""

import argparse
import json
from pathlib import Path

from mmlm.errors import InputError

GIB = 2**30


def train_budget_report(args: argparse.Namespace, spec, source: Path) -> str:
    """Return the training-memory table (or JSON with --json) of the VLM config `spec` for the CLI's options."""
    from mmlm.models.budget import patches_per_side
    from mmlm.models.train_budget import TrainSetup, plan_training
    from mmlm.models.vlm import VLMConfig

    if not isinstance(spec.buildable, VLMConfig) or spec.backbone.lm is None:
        raise InputError(f"{source}: --train budgets a VLM (vision tower + LM); {spec.name} is not one")
    setup = TrainSetup(args.batch_size, args.seq_len, args.images, args.devices, args.sharding, args.lora_rank,
                       args.precision, args.grad_checkpointing)  # fmt: skip
    setup.check()
    v = spec.buildable.vision
    image_tokens = patches_per_side(args.image_size or v.image_size, v.patch_size) ** 2 + int(v.class_token)
    b = plan_training(spec.buildable, spec.backbone.lm, image_tokens, setup)
    if args.json:
        out = {"model": spec.name, "config": str(source), **vars_of(setup), "vision_tokens_per_image": image_tokens,
               **b.to_dict()}  # fmt: skip
        return json.dumps(out, indent=2)
    mode = f"LoRA r={setup.lora_rank} (LM attention q,k,v,out)" if setup.lora_rank else "full fine-tuning"
    rows = [
        ("weights", b.weights_bytes),
        ("gradients", b.gradients_bytes),
        (
            "AdamW states" + (" (fp32 master, m, v)" if setup.precision == "bf16-mixed" else " (m, v)"),
            b.optimizer_bytes,
        ),
        ("FSDP gathered block", b.gathered_bytes),
        ("activations", b.activations_bytes),
        ("activations, grad checkpointing", b.activations_checkpointed_bytes),
    ]
    sharded = (
        f"FSDP over {setup.devices}" if setup.sharding == "fsdp" else f"DDP on {setup.devices} (replicated)"
    )
    lines = [
        f"model: {spec.name}   config: {source}",
        f"training: {mode}, {setup.precision}, {sharded}; per device batch {setup.batch} × {setup.sequence} "
        f"tokens, {setup.images} image(s) of {image_tokens} vision tokens each",
        f"parameters: {b.parameters:,} ({b.parameters / 1e9:.2f} B), trainable {b.trainable_parameters:,}",
        "",
        f"{'part':<38}{'GiB per device':>16}",
    ]
    lines += [f"{name:<38}{value / GIB:>16.2f}" for name, value in rows]
    lines += [
        f"{'total, no checkpointing':<38}{b.total_bytes(False) / GIB:>16.2f}",
        f"{'total, grad checkpointing':<38}{b.total_bytes(True) / GIB:>16.2f}",
        f"  of the activations: LM blocks {b.lm_activations_bytes / GIB:.2f}, vision tower "
        f"{b.vision_activations_bytes / GIB:.2f}, logits + log-softmax {b.logits_bytes / GIB:.2f} GiB",
        "  not counted: CUDA context and allocator fragmentation (often 1-3 GiB), data loader buffers",
    ]
    return "\n".join(lines)


def vars_of(setup) -> dict:
    """Return the setup's fields for the JSON output."""
    from dataclasses import asdict

    return asdict(setup)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Add --train and its options to `mmlm budget`."""
    p.add_argument(
        "--train", action="store_true", help="training memory per device instead of the image budget"
    )
    p.add_argument(
        "--seq-len", type=int, default=2048, help="--train: LM tokens per sample, image tokens included"
    )
    p.add_argument("--images", type=int, default=1, help="--train: images per sample")
    p.add_argument("--devices", type=int, default=1, help="--train: devices (N) for DDP or FSDP")
    p.add_argument("--sharding", default="ddp", help="--train: ddp (replicated) | fsdp (sharded 1/N)")
    p.add_argument("--lora-rank", type=int, help="--train: LoRA rank on the LM's attention projections")
    p.add_argument("--precision", default="bf16-mixed", help="--train: bf16-mixed | fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="--train: (both totals are printed)")
