"""A LoRA fine-tuning step of a LLaVA on CPU: mmlm's VLM trainer against transformers + peft.

The model is a random LLaVA-1.5-style one, "small" by default: a 3-layer CLIP tower at 224 px (patch 16, width
256; features from its penultimate layer without the class token: 196 image tokens), the 2-layer MLP connector,
and a Llama LM of width 384, 6 layers, 6 heads (2 KV heads), MLP 1024, vocabulary 4096. A batch is 4 rows of one
image and 64 text tokens (260 positions, no padding), the last 24 text tokens the answer (the labels), in fp32.

Both sides train LLaVA's stage 2 with LoRA: rank 8, alpha 16, dropout 0 on q, k, v, o, gate, up and down of
every LM layer, the connector trained too, tower and LM weights frozen; AdamW (lr 1e-3, weight decay 0.1 on
matrices, betas (0.9, 0.98), eps 1e-6) under the same warmup + cosine schedule, gradients clipped at 1.0.
- mmlm: the trainer's own functions: `add_lora`, `stage_optimizer`, `RowLosses`, `accumulate_gradients`,
  `optimizer_step` (mmlm.train.vlm_loop), as `mmlm train vlm` runs a stage with `train: [connector, lora]`;
- transformers + peft: LlavaForConditionalGeneration with `peft.get_peft_model` (its LoRA on the same LM
  modules, by regex, so the tower's own q/k/v stay plain), the projector unfrozen, `model(..., labels=).loss`.
Both load one set of random weights, and every LoRA A starts from the same seeded values (B is zero), so the
two compute the same losses step after step: the script checks the first step's loss agrees within 1e-4 and
stops otherwise, since timing two different computations would mean nothing.

Each side runs in its own worker process (its peak RSS is its own, as in bench_clip_train.py); the parent sends
them timed windows in turn, reversing the order every window, and reports samples/s (median, min-max over the
windows), peak RSS and the ratios mmlm/peft. mmlm's tower stops at the feature layer (the last block's output
is never used); transformers runs the whole tower.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_lora_step.py      # ~3 minutes, 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/bench_lora_step.py --quick                 # toy sizes, seconds
"""

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import transformers
from bench_clip_train import ask, peak_rss_mib, wait_for_quiet_machine
from safetensors.torch import load_file, save_file

from mmlm.train.config import OptimConfig
from mmlm.train.optim import build_scheduler, no_decay

SIDES = ("mmlm", "peft")
MODELS = {
    "small": {
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                       image_size=224, patch_size=16),
        "text": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024),
        "batch": 4, "text_tokens": 64, "answer_tokens": 24,
    },
    "tiny": {  # --quick
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=16),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
        "batch": 2, "text_tokens": 8, "answer_tokens": 4,
    },
}  # fmt: skip
RANK, ALPHA, LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 8, 16.0, 1e-3, 0.1, (0.9, 0.98), 1e-6, 1.0
SCHEDULE_STEPS = 1000  # the schedule's length: warmup 100 steps, so the timed steps all change the weights
BATCHES = 2  # distinct batches, cycled
# the LM's q, k, v, o, gate, up and down in transformers' LLaVA (≥ 4.52 names); the CLIP tower has q/k/v_proj too
PEFT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
LOSS_TOLERANCE = 1e-4
OPTIM = OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, grad_clip=GRAD_CLIP)


def llava_config(m: dict) -> transformers.LlavaConfig:
    """Return the LLaVA-1.5 layout: CLIP tower, penultimate-layer features without the class token, MLP
    projector, untied Llama LM; the image placeholder is the vocabulary's last id."""
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**m["vision"]), text_config=transformers.LlamaConfig(**m["text"]),
        image_token_index=m["text"]["vocab_size"] - 1, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip


def image_tokens(m: dict) -> int:
    """Return the image's LM positions: the patch grid (the class token is dropped)."""
    return (m["vision"]["image_size"] // m["vision"]["patch_size"]) ** 2


def random_batches(m: dict) -> list[dict[str, torch.Tensor]]:
    """Return BATCHES batches of ids [B, T] (bos, image slots, text), labels (-100 but on the answer), an all-ones
    attention mask and pixels [B, 3, H, W], identical in both workers."""
    g = torch.Generator().manual_seed(0)
    vocab, batch, size = m["text"]["vocab_size"], m["batch"], m["vision"]["image_size"]
    out = []
    for _ in range(BATCHES):
        text = torch.randint(3, vocab - 1, (batch, m["text_tokens"]), generator=g)
        ids = torch.cat(
            [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, image_tokens(m)), vocab - 1), text], 1
        )
        labels = torch.full_like(ids, -100)
        labels[:, -m["answer_tokens"] :] = ids[:, -m["answer_tokens"] :]
        pixels = torch.randn(batch, 3, size, size, generator=g)
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "attention_mask": torch.ones_like(ids),
                "pixel_values": pixels,
            }
        )
    return out


def seeded_lora_a(module: str, shape: torch.Size) -> torch.Tensor:
    """Return LoRA A [r, in] for the transformers module `module`: U(±1/√in), PEFT's init, seeded by the name."""
    g = torch.Generator().manual_seed(zlib.crc32(module.encode()))
    return (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[1])


def build_mmlm(m: dict, weights: dict[str, torch.Tensor]):
    """Return (model, step() -> loss) for mmlm's VisionLanguageModel as the VLM trainer runs a LoRA stage."""
    from mmlm.checkpoints.build import build_from_weights
    from mmlm.checkpoints.hf_llava import llava_key_map, llava_layout, vlm_config_from_llava
    from mmlm.checkpoints.peft import llama_module_names
    from mmlm.layers.lora import LoRALinear
    from mmlm.models.vlm import VisionLanguageModel
    from mmlm.train.vlm_config import LoRAConfig, StageConfig
    from mmlm.train.vlm_loop import (
        IntervalLosses,
        RowLosses,
        accumulate_gradients,
        add_lora,
        optimizer_step,
        set_trainable,
        stage_optimizer,
    )

    cfg = vlm_config_from_llava(llava_config(m).to_dict())
    rules = llava_key_map(cfg, llava_layout(set(weights)))
    model = build_from_weights(lambda: VisionLanguageModel(cfg), weights, rules, "bench").train()
    add_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0))
    names = llama_module_names("lm.", "model.language_model.")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                for part, a, _ in module.pairs():
                    a.copy_(
                        seeded_lora_a(
                            names(name if part is None else f"{name.rpartition('.')[0]}.{part}"), a.shape
                        )
                    )
    stage = StageConfig(steps=SCHEDULE_STEPS, train=["connector", "lora"], optim=OPTIM)
    cpu = torch.device("cpu")
    opt = stage_optimizer(model, stage, cpu)
    sched = build_scheduler(opt, OPTIM, stage.steps)
    set_trainable(model, stage, 0)
    net = RowLosses(model)
    extra = {"audio_features": None, "image_frames": None, "image_sizes": None,
             "audio_per_sample": torch.zeros(m["batch"], dtype=torch.long),
             "images_per_sample": torch.ones(m["batch"], dtype=torch.long)}  # fmt: skip
    batches = itertools.cycle([{**b, **extra} for b in random_batches(m)])

    def step() -> float:
        interval = IntervalLosses()
        accumulate_gradients(net, batches, 1, cpu, False, "token", interval)
        optimizer_step(model, opt, sched, GRAD_CLIP)
        return interval.figures()["loss"]

    return model, step


def build_peft(m: dict, weights: dict[str, torch.Tensor]):
    """Return (model, step() -> loss) for transformers' LlavaForConditionalGeneration under peft's LoRA."""
    import peft

    base = transformers.LlavaForConditionalGeneration(llava_config(m))
    base.load_state_dict(weights)
    lora = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS, bias="none"
    )
    model = peft.get_peft_model(base, lora).train()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                a = module.lora_A["default"].weight
                a.copy_(seeded_lora_a(name.removeprefix("base_model.model."), a.shape))
    model.base_model.model.model.multi_modal_projector.requires_grad_(True)  # stage 2 trains the connector
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if not no_decay(n, p)], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in trained if no_decay(n, p)], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    sched = build_scheduler(opt, OPTIM, SCHEDULE_STEPS)
    params = [p for _, p in trained]
    batches = itertools.cycle(random_batches(m))

    def step() -> float:
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.item()

    return model, step


def worker(args: argparse.Namespace) -> None:
    """Train one side on request: read `steps N` / `exit` lines on stdin, answer one JSON line each."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the replies
    weights = load_file(args.weights)
    model, step = (build_mmlm if args.worker == "mmlm" else build_peft)(MODELS[args.model], weights)
    del weights
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reply.write(json.dumps({"ready": args.worker, "trained_parameters": trained,
                            "rss_built_mib": round(peak_rss_mib(), 1)}) + "\n")  # fmt: skip
    for line in sys.stdin:
        command = line.split()
        if command[0] == "exit":
            break
        start = time.perf_counter()
        losses = [step() for _ in range(int(command[1]))]
        reply.write(json.dumps({"seconds": time.perf_counter() - start, "losses": losses}) + "\n")
    reply.write(json.dumps({"peak_rss_mib": round(peak_rss_mib(), 1)}) + "\n")


def check_same_loss(first: dict[str, float]) -> None:
    """Print both sides' first-step loss; stop if they differ by more than LOSS_TOLERANCE."""
    difference = abs(first["mmlm"] - first["peft"])
    print(
        json.dumps({"first_step_loss": first, "difference": difference, "tolerance": LOSS_TOLERANCE}),
        flush=True,
    )
    if difference > LOSS_TOLERANCE:
        sys.exit(f"the two sides compute different losses (difference {difference:.2e}): no timing")


def main() -> None:
    """Run both workers in turn and print the loss check, one JSON line per window, memory, then the summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed window")
    parser.add_argument("--repeats", type=int, default=6, help="timed windows per side")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per side first (the first is checked)"
    )
    parser.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-minute load is below")
    parser.add_argument("--quick", action="store_true", help="toy sizes, 1 window, no waiting for the load")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.model, args.steps, args.repeats, args.warmup, args.max_load = "tiny", 1, 1, 1, math.inf
    m = MODELS[args.model]
    load = wait_for_quiet_machine(args.max_load, 600)
    print(json.dumps({"model": args.model, **m, "image_tokens": image_tokens(m), "rank": RANK, "alpha": ALPHA,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "load_1min_at_start": round(load, 2)}), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "llava.safetensors"
        torch.manual_seed(0)
        save_file(transformers.LlavaForConditionalGeneration(llava_config(m)).state_dict(), weights)
        workers = {
            side: subprocess.Popen([sys.executable, __file__, f"--model={args.model}", f"--weights={weights}",
                                    "--worker", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for side in SIDES
        }  # fmt: skip
        ready = {side: json.loads(proc.stdout.readline()) for side, proc in workers.items()}
    print(json.dumps({"ready": ready}), flush=True)
    check_same_loss({side: ask(proc, f"steps {args.warmup}")["losses"][0] for side, proc in workers.items()})
    rates = {side: [] for side in SIDES}
    for window in range(args.repeats):
        order = list(workers.items())
        for side, proc in order if window % 2 == 0 else order[::-1]:  # reversed every other window
            r = ask(proc, f"steps {args.steps}")
            rates[side].append(args.steps * m["batch"] / r["seconds"])
            print(json.dumps({"side": side, "window": window, "samples_per_s": round(rates[side][-1], 3),
                              "loss": round(r["losses"][-1], 5), "load_1min": round(os.getloadavg()[0], 2)}),
                  flush=True)  # fmt: skip
    memory = {side: ask(proc, "exit")["peak_rss_mib"] for side, proc in workers.items()}
    for proc in workers.values():
        proc.wait()
    medians = {side: statistics.median(r) for side, r in rates.items()}
    print(json.dumps({"summary": {
        "samples_per_s": {side: {"median": round(medians[side], 3), "min": round(min(r), 3), "max": round(max(r), 3)}
                          for side, r in rates.items()},
        "peak_rss_mib": memory, "mmlm_over_peft": round(medians["mmlm"] / medians["peft"], 3),
        "peak_rss_ratio": round(memory["mmlm"] / memory["peft"], 3), "load_1min_at_end": round(os.getloadavg()[0], 2),
    }}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
