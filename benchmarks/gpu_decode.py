"""gpu_suite.py's vlm_decode section: LLaVA-1.5-7B's shapes with random weights, greedy decoding in bf16.

transformers builds LlavaForConditionalGeneration (a CLIP ViT-L/14-336 tower, 576 image tokens, and a
Llama-2-7B LM) directly on the GPU in bf16, and mmlm's VisionLanguageModel takes the same tensors through
LLaVA's key map (as `mmlm.load` does for a folder), so no 13-GB folder is written or read. Both decode 128 new
tokens greedily after a 600-token prompt (bos, 576 image slots, 23 text tokens) at batch 1 and 8, never
stopping early: mmlm with its preallocated (static) cache and with cache="graph" (fixed shapes, each decode
step a CUDA graph replay, no host read per token), transformers with its default dynamic cache and with its
static cache (without torch.compile: GPU.md records its compiled static path failing on LLaVA). A side that
fails records its error; the others go on. Every side is timed end to end with the device synchronised
around each call (`end_to_end`): decode tokens/s = batch·127 / (T(128 tokens) − T(1 token)), and time to
first token T(1 token), vision tower included. Peak memory is what one generation allocates above the loaded
weights (for mmlm_graph the first call's, which allocates the pooled cache).
"""

from collections.abc import Callable

import torch
import transformers
from bench_decode import transformers_cache_settings
from gpu_speed import peak_added_mib
from timing import alternating_rounds, now, ratio_of_medians, spread

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_llava import llava_key_map, llava_layout, vlm_config_from_llava
from mmlm.inference.generation import GenerationSettings, generate_ids, lm_step, new_rows
from mmlm.inference.graph_decode import decode_on_device
from mmlm.inference.graph_step import GraphPool, graph_runner
from mmlm.models.vlm import VisionLanguageModel

# LLaVA-1.5-7B: openai/clip-vit-large-patch14-336 and Llama-2-7B with LLaVA's 32064-token vocabulary
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, hidden_act="quick_gelu")  # fmt: skip
TINY_LLAMA = dict(LLAMA2_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
REFERENCE_CACHES = {"transformers_dynamic": "dynamic", "transformers_static": "static"}


def build_llava(vision: dict, text: dict, device: torch.device, dtype: torch.dtype):
    """Return (transformers LLaVA, mmlm VisionLanguageModel) sharing the same random weights on `device`."""
    image_id = text["vocab_size"] - 64  # a slot inside the vocabulary, as llava-1.5-hf's <image> (32000)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision), text_config=transformers.LlamaConfig(**text),
        image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in bf16: a 7B model never exists in fp32
    try:
        with torch.device(device):
            reference = transformers.LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    ours_cfg = vlm_config_from_llava(cfg.to_dict())
    weights = dict(reference.state_dict())  # the same tensors: mmlm's model adds no second copy of most
    layout = llava_layout(set(weights))
    if cfg.tie_word_embeddings:
        weights.pop(f"{layout.head}.weight", None)
    ours = build_from_weights(lambda: VisionLanguageModel(ours_cfg), weights, llava_key_map(ours_cfg, layout),
                              "gpu_suite", device, dtype)  # fmt: skip
    if device.type == "cpu":
        ours.lm.prepare_for_inference()  # what mmlm.load does on CPU
    return reference, ours


def prompt(batch: int, image_tokens: int, image_id: int, size: int, length: int, device, dtype):
    """Return ids [B, length] (bos, the image slots, random text) and random pixels [B, 3, size, size]."""
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(3, image_id, (batch, length - 1 - image_tokens), generator=g)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, image_tokens), image_id), text], 1
    )
    return ids.to(device), torch.randn(batch, 3, size, size, generator=g).to(device, dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generators(reference, ours, inputs) -> dict[str, Callable[[int], None]]:
    """Return, per side, a function that greedily generates n new tokens for the prompt `inputs` (no early stop).

    mmlm with its static cache and with cache="graph" (fixed shapes, CUDA graph replays, a GraphPool so the
    graph is captured once for all calls of the batch); transformers with its dynamic and its static cache.
    """
    ids, pixels = inputs
    batch = ids.shape[0]
    pool = GraphPool(ours.lm.new_fixed_cache)

    def mmlm_static(n: int) -> None:
        embeds = ours.embed_inputs(ids, pixels)
        kv = ours.lm.new_cache(batch, ids.shape[1] + n)
        for _ in generate_ids(lm_step(ours.lm), kv, GenerationSettings(n), [], None, embeds):
            pass

    def mmlm_graph(n: int) -> None:
        embeds = ours.embed_inputs(ids, pixels)
        settings = GenerationSettings(n)
        runner = graph_runner(lm_step(ours.lm), pool.cache(batch, ids.shape[1] + n))
        decode_on_device(runner, new_rows(settings, [], batch, ids.device), settings, [], None, embeds)

    def reference_side(cache: str) -> Callable[[int], None]:
        def run(n: int) -> None:
            out = reference.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                     **transformers_cache_settings(cache))  # fmt: skip
            assert out.shape[1] == ids.shape[1] + n

        return run

    sides = {"mmlm_static": mmlm_static, "mmlm_graph": mmlm_graph}
    return sides | {name: reference_side(cache) for name, cache in REFERENCE_CACHES.items()}


def end_to_end(
    run: Callable[[int], None], new_tokens: int, batch: int, device: torch.device
) -> tuple[float, float]:
    """Return (decode tokens/s, time to first token) from two synchronised generations of 1 and `new_tokens`
    tokens: decode rate = batch·(n − 1) / (T(n) − T(1)). The device is synchronised around each call only, so a
    side that never waits for the host per token is timed as fast as it runs (a per-token clock would see the
    launches, not the work)."""
    seconds = []
    for n in (1, new_tokens):
        synchronize(device)
        start = now()
        run(n)
        synchronize(device)
        seconds.append(now() - start)
    return batch * (new_tokens - 1) / max(seconds[1] - seconds[0], 1e-9), seconds[0]


def vlm_decode(suite) -> None:
    """Decode tokens/s, time to first token and peak memory of mmlm and transformers at LLaVA-1.5-7B shapes."""
    smoke = suite.smoke
    vision, text = (TINY_CLIP, TINY_LLAMA) if smoke else (CLIP_L14_336, LLAMA2_7B)
    batches, prompt_tokens, new_tokens, rounds = ([2], 24, 4, 1) if smoke else ([1, 8], 600, 128, 3)
    dtype = torch.bfloat16
    built = {}

    def build() -> dict:
        built["models"] = build_llava(vision, text, suite.device, dtype)
        parameters = sum(p.numel() for p in built["models"][0].parameters())
        return {"name": "build", "parameters": parameters}

    suite.part("vlm_decode", "build", "bf16", build, needs_s=0 if smoke else 60)
    if "models" not in built:
        return

    for batch in batches:

        def measure(batch=batch) -> list[dict]:
            reference, ours = built["models"]
            image_id = reference.config.image_token_index
            inputs = prompt(batch, ours.image_tokens, image_id, vision["image_size"], prompt_tokens, suite.device,
                            dtype)  # fmt: skip
            sides = generators(reference, ours, inputs)
            lines, memory = [], {}
            with torch.inference_mode():
                for name, run in list(sides.items()):  # warm-up (and graph capture), and each side's memory
                    try:
                        memory[name] = peak_added_mib(lambda r=run: r(new_tokens), suite.device)
                        if memory[name] is None:  # on CPU: still warm up
                            run(4)
                    except Exception as error:  # a side's failure is recorded, not fatal
                        message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
                        lines.append({"name": f"{name}/batch{batch}", "error": message})
                        del sides[name]
                measured = alternating_rounds(
                    {name: lambda r=run: end_to_end(r, new_tokens, batch, suite.device)
                     for name, run in sides.items()}, rounds)  # fmt: skip
            decode = {name: [r[0] for r in rows] for name, rows in measured.items()}
            for name in sides:
                line = {"name": f"{name}/batch{batch}", "batch": batch, "prompt_tokens": prompt_tokens,
                        "new_tokens": new_tokens, "rounds": rounds, "decode_tok_s": spread(decode[name], 2),
                        "ttft_s": spread([r[1] for r in measured[name]], 4), "peak_added_mib": memory[name]}  # fmt: skip
                if name.startswith("mmlm"):
                    for reference_name in REFERENCE_CACHES:
                        if reference_name in decode:
                            line[f"ratio_to_{reference_name}"] = ratio_of_medians(
                                decode[name], decode[reference_name]
                            )
                lines.append(line)
            return lines

        suite.part("vlm_decode", f"batch{batch}", "bf16", measure, needs_s=0 if smoke else 60)
    built.clear()  # the 7B weights go before the serve section starts its own server
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()
