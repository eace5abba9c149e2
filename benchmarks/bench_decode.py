"""Decode speed on CPU: mmlm's CausalLM against transformers' LlamaForCausalLM.generate, same random weights.

The model has SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152,
tied embeddings), fp32. transformers builds it, saves it, and mmlm loads that folder. Both decode greedily
from the same random prompt ids (batch 1 and 4, no padding) and never stop early.

Decode speed excludes the prefill: each implementation runs max_new_tokens=1 and max_new_tokens=N, and the
rate is (N − 1)·batch / (t_N − t_1) new tokens per second. One untimed round warms both up; the timed rounds
alternate the implementations, and the figures are medians.

    .venv/bin/python benchmarks/bench_decode.py [--batch 1 4] [--new-tokens 64] [--rounds 5] [--threads N]

mmlm.load puts the CPU model in its decode layout (DecoderLM.prepare_for_inference); `--layout plain` keeps
the checkpoint's layout, to measure what the layout alone brings.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import mmlm
from mmlm.generation import GenerationSettings, generate_ids, lm_step

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip


def write_checkpoint(folder: Path, seed: int = 0) -> transformers.LlamaForCausalLM:
    """Save a random SmolLM2-135M-shaped Llama (and a placeholder tokenizer) to `folder`; return it."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).eval()
    model.save_pretrained(folder)
    # mmlm.load wants a tokenizer; this benchmark works on token ids only, so any tokenizer.json will do.
    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def time_transformers(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Return seconds for transformers' greedy generate of `new_tokens` tokens (no early stop)."""
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def time_mmlm(lm, ids: torch.Tensor, new_tokens: int) -> float:
    """Return seconds for mmlm's greedy generation of `new_tokens` tokens with a static cache (no early stop)."""
    start = time.perf_counter()
    cache = lm.model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    steps = sum(1 for _ in generate_ids(lm_step(lm.model), cache, settings, [], ids))
    seconds = time.perf_counter() - start
    assert steps == new_tokens
    return seconds


def decode_rate(timer, model, ids: torch.Tensor, new_tokens: int) -> float:
    """Return new tokens per second after the prefill: (N − 1)·B / (t_N − t_1)."""
    first = timer(model, ids, 1)
    total = timer(model, ids, new_tokens)
    return (new_tokens - 1) * ids.shape[0] / (total - first)


def main() -> None:
    """Run the benchmark and print one JSON line per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layout", choices=["decode", "plain"], default="decode")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, python {platform.python_version()}, load {os.getloadavg()}", file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ref = write_checkpoint(Path(tmp))
        ours = mmlm.load(tmp)
    if args.layout == "plain":
        for p in ours.model.parameters():
            p.data = p.data.contiguous()
    timers = {"transformers": (time_transformers, ref), "mmlm": (time_mmlm, ours)}
    for batch in args.batch:
        ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(batch))  # fmt: skip
        for timer, model in timers.values():  # warm-up, untimed
            decode_rate(timer, model, ids, 8)
        rates: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(args.rounds):
            for name, (timer, model) in timers.items():
                rates[name].append(decode_rate(timer, model, ids, args.new_tokens))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        print(json.dumps({
            "batch": batch, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
            "transformers_tok_s": round(medians["transformers"], 2), "mmlm_tok_s": round(medians["mmlm"], 2),
            "ratio": round(medians["mmlm"] / medians["transformers"], 3),
            "runs": {name: [round(x, 2) for x in r] for name, r in rates.items()}, "load": os.getloadavg(),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
