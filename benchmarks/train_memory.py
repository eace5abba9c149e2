"""Check `mmlm budget --train` against one measured CPU training step of a small random LLaVA-shaped VLM.

Measures, in fp32: weights, gradients and AdamW states as the bytes of the real tensors after one
forward+backward+AdamW step, activations as the unique storages autograd saved for backward
(torch.autograd.graph.saved_tensors_hooks), and the process's peak-RSS growth over the step (meaningful for the first run only: ru_maxrss is a lifetime peak). Prints one JSON line per mode (full, LoRA r=8).

    .venv/bin/python benchmarks/train_memory.py            # batch 2 x 256 tokens, the docs/training-memory.md figures
    .venv/bin/python benchmarks/train_memory.py --quick    # batch 1 x 96: a check that it runs
"""

import argparse
import json
import resource

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from mmlm.cli.budget import spec_from_config
from mmlm.layers.lora import apply_lora
from mmlm.models.train_budget import LORA_TARGETS, TrainSetup, plan_training
from mmlm.models.vlm import VisionLanguageModel


def measure(lora: int | None, batch: int = 2, seq: int = 256) -> dict:
    """Return planned and measured bytes of one fp32 step; LoRA rank `lora` or full fine-tuning."""
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=112, patch_size=14),
        text_config=LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=8, vocab_size=4000),
        vocab_size=4000, image_token_index=3999,
    )  # fmt: skip
    spec = spec_from_config(cfg.to_dict(), "tiny")
    setup = TrainSetup(batch, seq, lora_rank=lora, precision="fp32")
    v = spec.buildable.vision
    plan = plan_training(spec.buildable, spec.backbone.lm, (v.image_size // v.patch_size) ** 2 + 1, setup)
    torch.manual_seed(0)
    model = VisionLanguageModel(spec.buildable)
    if lora:
        apply_lora(model, lora, 2.0 * lora, LORA_TARGETS)
    image_tokens = (v.image_size // v.patch_size) ** 2
    ids = torch.randint(0, 3000, (batch, seq))
    ids[:, 1 : 1 + image_tokens] = 3999
    pixels = torch.randn(batch, 3, v.image_size, v.image_size)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, pixels).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    acts = sum(n for ptr, n in saved.items() if ptr not in params) + logits.numel() * logits.element_size()
    loss.backward()
    optimizer.step()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optim = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    return {
        "mode": f"lora{lora}" if lora else "full", "batch": batch, "seq": seq,
        "weights": [plan.weights_bytes, weights], "gradients": [plan.gradients_bytes, grads],
        "optimizer": [plan.optimizer_bytes, optim], "activations": [plan.activations_bytes, acts],
        "step_peak_rss_growth_vs_plan_grads_optim_acts": [
            plan.gradients_bytes + plan.optimizer_bytes + plan.activations_bytes, rss1 - rss0],
    }  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 x 96 tokens: a check that it runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch, seq = (1, 96) if args.quick else (2, 256)
    for rank in (None, 8):
        print(json.dumps(measure(rank, batch, seq)))
