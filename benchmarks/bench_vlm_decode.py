"""LLaVA decode speed on CPU: mmlm's VisionLanguageModel against transformers' LlavaForConditionalGeneration.generate.

nanoVLM-222M shapes with the MLP connector: a SigLIP-B/16-224 tower (196 image tokens) and a SmolLM2-135M
LM (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152), random weights shared by both,
fp32. Both decode greedily from the same prompt (one image, 24 text tokens) and never stop early. Decode
speed excludes the prefill, as in bench_decode.py: batch / the median time between new tokens (robust to other
jobs taking the CPU for a moment); prefill is the time to the first new token, vision tower included.

Both sides use the same kind of KV cache, as in bench_decode.py: `--cache static` (the default) or `--cache
dynamic`, never one of each. The timed rounds alternate the two, reversing which goes first every round.

    .venv/bin/python benchmarks/bench_vlm_decode.py [--batch 1 4] [--new-tokens 64] [--rounds 5] [--cache static]
        [--threads 1 --clock cpu]   # CPU time per step: steady when other jobs share the cores (bench_decode.py)
    .venv/bin/python benchmarks/bench_vlm_decode.py --memory [--batch 1 4]
    .venv/bin/python benchmarks/bench_vlm_decode.py --quick     # toy shapes, 1 round: checks that it runs

--memory reports instead the peak memory one generation call adds above the loaded weights: each side runs
in a fresh process holding only its own model, returns freed memory to the system (malloc_trim), then samples
its resident set every millisecond while it generates.
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import transformers
from bench_decode import CACHES, SMOLLM2_135M, TINY_LLAMA, StepClock, mmlm_cache, transformers_cache_settings
from timing import CLOCKS, alternating_rounds, now, spread, use_clock

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_llava import llava_key_map, llava_layout, vlm_config_from_llava
from mmlm.inference.generation import GenerationSettings, generate_ids, lm_step
from mmlm.models.vlm import VisionLanguageModel

SIGLIP_B16_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)  # fmt: skip
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=16)  # fmt: skip
# the image token is the last id; mmlm's and transformers' prompts both use it
SHAPES = {"nanovlm": (SIGLIP_B16_224, SMOLLM2_135M), "tiny": (TINY_SIGLIP, TINY_LLAMA)}


def image_token(shapes: str) -> int:
    """Return the image placeholder id for `shapes`: the vocabulary's last."""
    return SHAPES[shapes][1]["vocab_size"] - 1


def build_models(shapes: str = "nanovlm", seed: int = 0):
    """Return (transformers LLaVA, mmlm VisionLanguageModel) holding the same random weights."""
    torch.manual_seed(seed)
    vision, text = SHAPES[shapes]
    cfg = transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(**vision),
        text_config=transformers.LlamaConfig(**text), image_token_index=image_token(shapes),
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True,
    )  # fmt: skip
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    ours_cfg = vlm_config_from_llava(cfg.to_dict())
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    layout = llava_layout(set(weights))
    weights.pop(f"{layout.head}.weight", None)  # tied to the embedding
    ours = build_from_weights(
        lambda: VisionLanguageModel(ours_cfg), weights, llava_key_map(ours_cfg, layout), "bench"
    )
    ours.lm.prepare_for_inference()  # what mmlm.load does on CPU
    return ref, ours


def prompt(
    batch: int, image_tokens: int, shapes: str = "nanovlm", text_tokens: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ids [B, 1 + image_tokens + text_tokens] (bos, image slots, text) and random pixels [B, 3, H, W]."""
    g = torch.Generator().manual_seed(batch)
    image_id, size = image_token(shapes), SHAPES[shapes][0]["image_size"]
    text = torch.randint(3, image_id, (batch, text_tokens), generator=g)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, image_tokens), image_id), text], 1
    )
    return ids, torch.randn(batch, 3, size, size, generator=g)


def transformers_token_times(model, inputs, new_tokens: int, cache: str) -> list[float]:
    """Return the call's start, then the arrival time of each new token, in transformers' LLaVA generate."""
    ids, pixels = inputs
    clock = StepClock()
    start = now()
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         stopping_criteria=transformers.StoppingCriteriaList([clock]),
                         **transformers_cache_settings(cache))  # fmt: skip
    assert out.shape[1] == ids.shape[1] + new_tokens
    return [start, *clock.times]


def mmlm_token_times(model, inputs, new_tokens: int, cache: str) -> list[float]:
    """Return the call's start, then the arrival time of each new token, in mmlm's greedy generation."""
    ids, pixels = inputs
    start = now()
    embeds = model.embed_inputs(ids, pixels)
    cache = mmlm_cache(model.lm, ids.shape[0], ids.shape[1] + new_tokens, cache)
    settings = GenerationSettings(new_tokens)
    times = [now() for _ in generate_ids(lm_step(model.lm), cache, settings, [], None, embeds)]
    assert len(times) == new_tokens
    return [start, *times]


def rates(token_times, model, inputs, new_tokens: int, cache: str) -> tuple[float, float]:
    """Return (decode tokens/s: batch / median step between new tokens, prefill seconds to the first token)."""
    times = token_times(model, inputs, new_tokens, cache)
    steps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    return inputs[0].shape[0] / statistics.median(steps), times[1] - times[0]


def resident_bytes() -> int:
    """Return this process's resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_added_bytes(fn) -> int:
    """Return the most resident memory `fn()` adds above what the process held when it started."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the baseline is what is in use
    base, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident_bytes()) - base


def child_memory(name: str, batch: int, new_tokens: int, cache: str, shapes: str) -> None:
    """In this process: build only `name`'s model, generate once, print the peak memory it added as JSON."""
    ref, ours = build_models(shapes)
    inputs = prompt(batch, ours.image_tokens, shapes)
    model, timer = (ref, transformers_token_times) if name == "transformers" else (ours, mmlm_token_times)
    del ref, ours
    added = peak_added_bytes(lambda: timer(model, inputs, new_tokens, cache))
    print(json.dumps({"name": name, "batch": batch, "peak_added_mb": round(added / 2**20, 1)}))


def memory(batches: list[int], new_tokens: int, cache: str, quick: bool) -> None:
    """Print, per batch, the peak memory generation adds in transformers and in mmlm (fresh processes)."""
    for batch in batches:
        row = {"batch": batch, "new_tokens": new_tokens, "cache": cache}
        for name in ("transformers", "mmlm"):
            out = subprocess.run([sys.executable, __file__, "--child-memory", name, "--batch", str(batch),
                                  "--new-tokens", str(new_tokens), "--cache", cache] + ["--quick"] * quick,
                                 capture_output=True, text=True, check=True)  # fmt: skip
            row[f"{name}_peak_added_mb"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_added_mb"]
        print(json.dumps(row), flush=True)


def main() -> None:
    """Run the benchmark and print one JSON line per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument(
        "--memory", action="store_true", help="report peak memory added by generation instead"
    )
    parser.add_argument("--child-memory", choices=["transformers", "mmlm"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=CACHES, default="static", help="the KV cache of both sides")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: time a user waits; cpu: the thread's CPU time, steady on a shared machine "
                             "(needs --threads 1)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="toy shapes, 1 round: a check that it runs")
    args = parser.parse_args()
    shapes = "tiny" if args.quick else "nanovlm"
    if args.quick and not args.child_memory:
        args.batch, args.new_tokens, args.rounds = [1], 6, 1
    torch.set_grad_enabled(False)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: run it with --threads 1")
    use_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)  # steadier than 2 threads when other jobs share the cores
    if args.child_memory:
        return child_memory(args.child_memory, args.batch[0], args.new_tokens, args.cache, shapes)
    print(f"# KV cache: {args.cache} on both sides", file=sys.stderr)
    if args.memory:
        return memory(args.batch, args.new_tokens, args.cache, args.quick)
    ref, ours = build_models(shapes)
    timers = {"transformers": (transformers_token_times, ref), "mmlm": (mmlm_token_times, ours)}
    for batch in args.batch:
        inputs = prompt(batch, ours.image_tokens, shapes)
        for timer, model in timers.values():  # warm-up, untimed
            rates(timer, model, inputs, 4, args.cache)
        measured = alternating_rounds(
            {name: lambda t=timer, m=model, inputs=inputs: rates(t, m, inputs, args.new_tokens, args.cache)
             for name, (timer, model) in timers.items()}, args.rounds)  # fmt: skip
        decode = {name: [tok_s for tok_s, _ in r] for name, r in measured.items()}
        prefill = {name: [first for _, first in r] for name, r in measured.items()}
        med = {name: statistics.median(r) for name, r in decode.items()}
        print(json.dumps({
            "batch": batch, "cache": args.cache, "image_tokens": ours.image_tokens, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "tok_s": {name: spread(r, 2) for name, r in decode.items()},
            "ratio": round(med["mmlm"] / med["transformers"], 3),
            "prefill_s": {name: spread(p, 3) for name, p in prefill.items()}, "load": os.getloadavg(),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
