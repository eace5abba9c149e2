"""Decode speed on CPU: mmlm's CausalLM against transformers' LlamaForCausalLM.generate, same random weights.

The model has SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152,
tied embeddings), fp32. transformers builds it, saves it, and mmlm loads that folder. Both decode greedily
from the same random prompt ids (batch 1 and 4, no padding) and never stop early.

Decode speed excludes the prefill: both note when each new token arrives (transformers through a stopping
criterion that never stops, mmlm as generate_ids yields it), and the rate is batch / median time between
consecutive tokens. One untimed round warms both up; the timed rounds alternate the implementations,
reversing which goes first every round (timing.py); the figures are medians over rounds, and the median of the per-round ratios.

Both sides use the same kind of KV cache, never one of each: `--cache static` (the default) gives mmlm a cache
preallocated for prompt + new tokens and transformers `cache_implementation="static"`; `--cache dynamic` gives
mmlm its growing KVCache and transformers its DynamicCache. transformers never compiles here (disable_compile:
on a GPU a static cache would otherwise switch on torch.compile for transformers alone).

`--cache graph` gives mmlm its fixed-shape decode (FixedDecodeCache, GraphStep, graph_decode.decode_on_device:
no host read per token; a CUDA graph only on a GPU, so on this CPU the same fixed-shape steps run eagerly), and
transformers its static cache, the closest setting it has. That loop yields no token as it comes, so the
benchmark notes the time when each step returns (on a CPU the step's work is done by then).

    .venv/bin/python benchmarks/bench_decode.py [--batch 1 4] [--new-tokens 64] [--rounds 5] [--threads N]
        [--cache static|dynamic|graph] [--clock wall|cpu]
    .venv/bin/python benchmarks/bench_decode.py --quick    # a 2-layer model, 1 round: checks that it runs

mmlm.load puts the CPU model in its decode layout (DecoderLM.prepare_for_inference); `--layout plain` keeps
the checkpoint's layout, to measure what the layout alone brings.

`--clock cpu --threads 1` times steps by the calling thread's CPU time instead of the wall clock: on a machine
other jobs share, a step's wall time includes the time it waited for a core, its CPU time does not.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from timing import CLOCKS, alternating_rounds, now, spread, use_clock
from tokenizers import Tokenizer, models, pre_tokenizers

import mmlm
from mmlm.inference.generation import GenerationSettings, generate_ids, lm_step, new_rows
from mmlm.inference.graph_decode import decode_on_device
from mmlm.inference.graph_step import GraphStep

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
# --quick: the same family at toy size, so a check that the benchmark runs takes seconds
TINY_LLAMA = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
CACHES = ("static", "dynamic", "graph")


def write_checkpoint(
    folder: Path, shapes: dict = SMOLLM2_135M, seed: int = 0
) -> transformers.LlamaForCausalLM:
    """Save a random Llama of `shapes` (SmolLM2-135M's by default) and a placeholder tokenizer to `folder`; return it."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes)).eval()
    model.save_pretrained(folder)
    # mmlm.load wants a tokenizer; this benchmark works on token ids only, so any tokenizer.json will do.
    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return model


class StepClock(transformers.StoppingCriteria):
    """A stopping criterion that never stops: it notes the time at which each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def transformers_cache_settings(cache: str) -> dict:
    """Return transformers generate's keyword arguments for mmlm's `cache`, without compiling: a static cache
    for "static" and for "graph" (transformers has no fixed-shape decode outside torch.compile), else dynamic."""
    implementation = "dynamic" if cache == "dynamic" else "static"
    return {"cache_implementation": implementation, "disable_compile": True}


def transformers_token_times(model, ids: torch.Tensor, new_tokens: int, cache: str) -> list[float]:
    """Return the arrival time of each new token in transformers' greedy generate (no early stop)."""
    clock = StepClock()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         stopping_criteria=transformers.StoppingCriteriaList([clock]),
                         **transformers_cache_settings(cache))  # fmt: skip
    assert out.shape[1] == ids.shape[1] + new_tokens
    return clock.times


def mmlm_cache(model, batch: int, length: int, cache: str) -> list:
    """Return an empty mmlm KV cache: preallocated for `length` positions (static), growing (dynamic), or of
    fixed shape for `length` slots (graph)."""
    if cache == "graph":
        return model.new_fixed_cache(batch, length)
    return model.new_cache(batch, length if cache == "static" else None)


class TimedStep(GraphStep):
    """A GraphStep that notes when the prefill and each step return (on a CPU, when their logits exist)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    def prefill(self, *args, **kwargs) -> torch.Tensor:
        logits = super().prefill(*args, **kwargs)
        self.times.append(now())
        return logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = super().__call__(tokens)
        self.times.append(now())
        return logits


def mmlm_token_times(lm, ids: torch.Tensor, new_tokens: int, cache: str) -> list[float]:
    """Return the arrival time of each new token in mmlm's greedy generation (no early stop)."""
    settings = GenerationSettings(max_new_tokens=new_tokens)
    kv = mmlm_cache(lm.model, ids.shape[0], ids.shape[1] + new_tokens, cache)
    if cache == "graph":
        step = TimedStep(lm_step(lm.model), kv)
        decode_on_device(step, new_rows(settings, [], ids.shape[0], ids.device), settings, [], ids)
        times = step.times
    else:
        times = [now() for _ in generate_ids(lm_step(lm.model), kv, settings, [], ids)]
    assert len(times) == new_tokens
    return times


def decode_rate(token_times, model, ids: torch.Tensor, new_tokens: int, cache: str) -> float:
    """Return new tokens per second after the prefill: batch / median time between consecutive tokens.

    The median step, not the mean, so that another job taking the CPU for a moment does not count.
    """
    times = token_times(model, ids, new_tokens, cache)
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]  # the first token comes with the prefill
    return ids.shape[0] / statistics.median(steps)


def main() -> None:
    """Run the benchmark and print one JSON line per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layout", choices=["decode", "plain"], default="decode")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument("--cache", choices=CACHES, default="static", help="the KV cache of both sides")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: time a user waits; cpu: the thread's CPU time, steady on a shared machine "
                             "(needs --threads 1)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, 1 round: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.rounds = [1], 8, 1
    shapes = TINY_LLAMA if args.quick else SMOLLM2_135M
    torch.set_grad_enabled(False)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: run it with --threads 1")
    use_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, python {platform.python_version()}, load {os.getloadavg()}", file=sys.stderr)  # fmt: skip
    if args.cache == "graph":
        print("# KV cache: mmlm graph (fixed shapes, no host read per token; CUDA graph on a GPU only), "
              "transformers static (the closest it has)", file=sys.stderr)  # fmt: skip
    else:
        print(f"# KV cache: {args.cache} on both sides", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        ref = write_checkpoint(Path(tmp), shapes)
        ours = mmlm.load(tmp)
    if args.layout == "plain":
        for p in ours.model.parameters():
            p.data = p.data.contiguous()
    timers = {"transformers": (transformers_token_times, ref), "mmlm": (mmlm_token_times, ours)}
    for batch in args.batch:
        ids = torch.randint(3, shapes["vocab_size"], (batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(batch))  # fmt: skip
        for timer, model in timers.values():  # warm-up, untimed
            decode_rate(timer, model, ids, 8, args.cache)
        rates = alternating_rounds(
            {name: lambda t=timer, m=model, ids=ids: decode_rate(t, m, ids, args.new_tokens, args.cache)
             for name, (timer, model) in timers.items()}, args.rounds)  # fmt: skip
        medians = {name: statistics.median(r) for name, r in rates.items()}
        paired = [m / t for m, t in zip(rates["mmlm"], rates["transformers"], strict=True)]
        print(json.dumps({
            "batch": batch, "cache": args.cache, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
            "rounds": args.rounds, "tok_s": {name: spread(r, 2) for name, r in rates.items()},
            "ratio": round(medians["mmlm"] / medians["transformers"], 3),
            "median_paired_ratio": round(statistics.median(paired), 3), "load": os.getloadavg(),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
