"""LLaVA decode speed on CPU: mmlm's VisionLanguageModel against transformers' LlavaForConditionalGeneration.generate.

nanoVLM-222M shapes with the MLP connector: a SigLIP-B/16-224 tower (196 image tokens) and a SmolLM2-135M
LM (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49152), random weights shared by both,
fp32. Both decode greedily from the same prompt (one image, 24 text tokens) and never stop early. Decode
speed excludes the prefill, as in bench_decode.py: (N − 1)·batch / (t_N − t_1); prefill is t_1.

    .venv/bin/python benchmarks/bench_vlm_decode.py [--batch 1 4] [--new-tokens 64] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import time

import torch
import transformers
from bench_decode import SMOLLM2_135M, decode_rate

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_llava import llava_key_map, llava_layout, vlm_config_from_llava
from mmlm.generation import GenerationSettings, generate_ids, lm_step
from mmlm.vlm import VisionLanguageModel

SIGLIP_B16_224 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)  # fmt: skip
IMAGE_TOKEN = SMOLLM2_135M["vocab_size"] - 1


def build_models(seed: int = 0):
    """Return (transformers LLaVA, mmlm VisionLanguageModel) holding the same random weights."""
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(**SIGLIP_B16_224),
        text_config=transformers.LlamaConfig(**SMOLLM2_135M), image_token_index=IMAGE_TOKEN,
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


def prompt(batch: int, image_tokens: int, text_tokens: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ids [B, 1 + image_tokens + text_tokens] (bos, image slots, text) and random pixels [B, 3, 224, 224]."""
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(3, IMAGE_TOKEN, (batch, text_tokens), generator=g)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, image_tokens), IMAGE_TOKEN), text], 1
    )
    return ids, torch.randn(batch, 3, 224, 224, generator=g)


def time_transformers(model, inputs, new_tokens: int) -> float:
    """Return seconds for transformers' greedy LLaVA generate of `new_tokens` tokens (prefill included)."""
    ids, pixels = inputs
    start = time.perf_counter()
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def time_mmlm(model, inputs, new_tokens: int) -> float:
    """Return seconds for mmlm's greedy generation (static cache) of `new_tokens` tokens (prefill included)."""
    ids, pixels = inputs
    start = time.perf_counter()
    embeds = model.embed_inputs(ids, pixels)
    cache = model.lm.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
    steps = sum(
        1 for _ in generate_ids(lm_step(model.lm), cache, GenerationSettings(new_tokens), [], None, embeds)
    )
    seconds = time.perf_counter() - start
    assert steps == new_tokens
    return seconds


class Inputs(tuple):
    """(ids, pixels) with the batch size where decode_rate looks for it."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self[0].shape


def main() -> None:
    """Run the benchmark and print one JSON line per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    ref, ours = build_models()
    timers = {"transformers": (time_transformers, ref), "mmlm": (time_mmlm, ours)}
    for batch in args.batch:
        inputs = Inputs(prompt(batch, ours.image_tokens))
        for timer, model in timers.values():  # warm-up, untimed
            decode_rate(timer, model, inputs, 4)
        rates: dict[str, list[float]] = {name: [] for name in timers}
        prefill: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(args.rounds):
            for name, (timer, model) in timers.items():
                rates[name].append(decode_rate(timer, model, inputs, args.new_tokens))
                prefill[name].append(timer(model, inputs, 1))
        med = {name: statistics.median(r) for name, r in rates.items()}
        print(json.dumps({
            "batch": batch, "image_tokens": ours.image_tokens, "new_tokens": args.new_tokens,
            "transformers_tok_s": round(med["transformers"], 2), "mmlm_tok_s": round(med["mmlm"], 2),
            "ratio": round(med["mmlm"] / med["transformers"], 3),
            "prefill_s": {name: round(statistics.median(p), 3) for name, p in prefill.items()},
            "runs": {name: [round(x, 2) for x in r] for name, r in rates.items()}, "load": os.getloadavg(),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
