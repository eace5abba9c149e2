"""VLM decode and prefill speed per family on CPU: mmlm against transformers' generate, same random weights.

One family table drives every family: how transformers builds the model from small shapes, how mmlm reads
that config and which key map renames its state_dict, and how one prompt's inputs look on each side. The
families (small shapes: a SigLIP-style tower of 4 layers, width 256, 64-px tiles; a Llama LM of 6 layers, width
384, vocabulary 8192, tied embeddings; fp32):

- llava: LLaVA-1.5, one 64-px image of 4-px patches: 256 image tokens;
- llava_next: LLaVA-NeXT, one 128x128 image cut into a 2x2 grid of 64-px tiles (8-px patches) plus the global
  view: 64 + 16x(16+1) = 336 image tokens;
- idefics3: Idefics3/SmolVLM, one image split into 2x2 64-px tiles plus the global view, 4-px patches, pixel
  shuffle r=2: 5 x 64 = 320 image tokens;
- qwen2_vl, qwen2_5_vl: Qwen2-VL / Qwen2.5-VL, one 128-px image at native resolution, 4-px patches (a 32x32 grid,
  two frames per patch as Qwen's processor stacks a still image) merged 2x2: 256 image tokens; the same Llama
  shapes as a Qwen2 LM (biased q/k/v) with M-RoPE sections [8, 12, 12]. Qwen2.5-VL's tower is RMSNorm + SwiGLU
  with 32-px attention windows in blocks 0-2 and the whole image in block 3.
- gemma3: Gemma 3, the SigLIP tower pooled 2x2 (64 image tokens, attending both ways in the prompt), a Gemma 3
  LM of the Llama shapes (head_dim 64, 5 sliding-window layers of window 128, then a global one);
- blip2: BLIP-2 with OPT, an EVA-style tower of the SigLIP shapes, a Q-Former as wide and deep (cross-attention
  every 2nd layer) with 32 queries (32 image tokens, before OPT's </s>), an OPT LM of the Llama shapes;
- idefics: Idefics (v1, Flamingo-style), a CLIP tower, a 2-layer Perceiver of 64 latents, the Llama shapes
  (no grouped KV heads) with a gated cross-attention block before every 2nd layer: one <image> token;
- chameleon: Chameleon, a VQ-GAN coding the 64-px image as 16x16 = 256 code tokens (codebook 1024), the Llama
  shapes with per-head q/k LayerNorm.

Each prompt is <bos>, the image tokens, 24 random text tokens; pixels are random. transformers builds the model,
its state_dict goes through the family's key map into mmlm's VisionLanguageModel (in the decode layout that
mmlm.load gives on CPU). Both decode greedily and never stop early, with a static KV cache on both sides
(transformers: cache_implementation="static", disable_compile). Decode speed is batch / the median time between
new tokens; prefill is the time to the first new token, vision tower included. The timed rounds alternate the
two sides, reversing which goes first each round (timing.py). `same_tokens` says whether both sides generated
the same tokens in the untimed warm-up, and `max_logit_gap` is the largest difference between their prompt
logits: both show that the two sides ran the same model on the same inputs. `image_s` splits the prefill: each
side's time to turn the images into LM-width tokens alone (tower, connector, LLaVA-NeXT's tile merge), timed
apart from generation in rounds of its own.

    .venv/bin/python benchmarks/bench_vlm_families.py [--families llava qwen2_vl ...] [--batch 1 4]
        [--new-tokens 64] [--rounds 3] [--threads 1 --clock cpu]
    .venv/bin/python benchmarks/bench_vlm_families.py --quick     # toy shapes, 1 round: checks that it runs
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from bench_decode import TINY_LLAMA, StepClock, transformers_cache_settings
from timing import CLOCKS, alternating_rounds, now, spread, use_clock
from vlm_family_builders import (
    between_markers,
    blip2_reference,
    chameleon_reference,
    cross_attended,
    gemma3_reference,
    gemma3_rules,
    idefics_images,
    idefics_reference,
    image_blocks,
    images_then_text,
    latest_image,
    spliced,
    untied_rules,
    vq_coded,
)

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_blip2 import TEXT_ONLY, blip2_vlm_key_map, vlm_config_from_blip2
from mmlm.checkpoints.hf_chameleon import chameleon_config_from_hf, chameleon_key_map
from mmlm.checkpoints.hf_gemma3 import gemma3_config_from_hf
from mmlm.checkpoints.hf_idefics import idefics_key_map, vlm_config_from_idefics
from mmlm.checkpoints.hf_idefics3 import idefics3_key_map, vlm_config_from_idefics3
from mmlm.checkpoints.hf_llava import llava_key_map, llava_layout, vlm_config_from_llava
from mmlm.checkpoints.hf_qwen2_vl import qwen2_vl_config_from_hf, qwen2_vl_key_map
from mmlm.checkpoints.keymap import Rule
from mmlm.inference.generation import GenerationSettings, generate_ids, vlm_step
from mmlm.models.chameleon import ChameleonModel
from mmlm.models.gemma3 import Gemma3Model
from mmlm.models.qwen2_vl import Qwen2VLModel
from mmlm.models.vlm import VisionLanguageModel, VLMConfig

SMALL_SIGLIP = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=64, patch_size=4)  # fmt: skip
SMALL_LLAMA = dict(TINY_LLAMA, vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)  # fmt: skip
SHAPES = {"small": (SMALL_SIGLIP, SMALL_LLAMA), "tiny": (TINY_SIGLIP, TINY_LLAMA)}
TEXT_TOKENS = 24
GRID = 2  # llava_next's, idefics3's image: a 2x2 grid of tiles (+ the global view); Qwen's: twice as wide


@dataclass(frozen=True)
class Family:
    """How to build one VLM family on both sides and feed both the same prompt."""

    reference: Callable[[dict, dict, int], transformers.PreTrainedModel]  # (vision, text, image id) -> model
    config: Callable[[dict], VLMConfig]  # transformers config dict -> mmlm's
    key_map: Callable[[VLMConfig, set[str]], tuple[list[Rule], str]]  # -> (rules, the tied head's name)
    # (mmlm model, batch, pixels [B·views, 3, S, S]) -> (image tokens per prompt, transformers' extra
    # generate arguments, mmlm's extra prepare arguments)
    images: Callable[[VisionLanguageModel, int, torch.Tensor], tuple[int, dict, dict]]
    views: int  # tower inputs per image
    side: int = 1  # an image's side in tiles of the SigLIP shapes' image_size
    model: Callable[[object], torch.nn.Module] = VisionLanguageModel  # mmlm's model class for the config
    # (batch, image tokens, text [B, 24], image id) -> ids [B, T]: bos, the image tokens, the text by default
    prompt: Callable[[int, int, torch.Tensor, int], torch.Tensor] = None  # type: ignore[assignment]
    # (ids, image id) -> transformers' inputs that mark the prompt's image tokens (not the images themselves)
    marks: Callable[[torch.Tensor, int], dict] | None = None
    # (transformers model, its image arguments) -> its images in LM width (or codes): timed as image_s
    reference_images: Callable[[transformers.PreTrainedModel, dict], object] | None = None
    # (mmlm model, ids, its image arguments) -> (prompt embeddings, media): mmlm's prefill before the LM
    prepare: Callable[[torch.nn.Module, torch.Tensor, dict], tuple[torch.Tensor, object]] | None = None
    dropped: re.Pattern | None = None  # transformers tensors mmlm's inference does not use
    cache: str = "static"  # the KV cache both sides use


def llava_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return LLaVA-1.5 with a SigLIP tower (every token kept) and a Llama LM."""
    cfg = transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(**vision), text_config=transformers.LlamaConfig(**text),
        image_token_index=image_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg)


def llava_next_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return LLaVA-NeXT with 8-px patches (64 tokens per 64-px tile) whose grids include 2x2 tiles."""
    side = vision["image_size"]
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.SiglipVisionConfig(**dict(vision, patch_size=2 * vision["patch_size"])),
        text_config=transformers.LlamaConfig(**text), image_token_index=image_id, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True,
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
    )  # fmt: skip
    return transformers.LlavaNextForConditionalGeneration(cfg)


def idefics3_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return Idefics3 (pixel shuffle r=2, bias-free projection) with a Llama LM."""
    cfg = transformers.Idefics3Config(
        vision_config=vision, text_config=transformers.LlamaConfig(**text).to_dict(), image_token_id=image_id,
        scale_factor=2, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Idefics3ForConditionalGeneration(cfg)


def qwen_reference(model_type: str) -> Callable[[dict, dict, int], transformers.PreTrainedModel]:
    """Return a builder of Qwen2-VL or Qwen2.5-VL from the SigLIP shapes (as the native-resolution tower) and
    the Llama shapes (as a Qwen2 LM with M-RoPE)."""

    def build(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
        heads = text["num_attention_heads"]
        third = text["hidden_size"] // heads // 2 // 8  # M-RoPE's t/h/w frequencies in Qwen's 2:3:3 split
        lm = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [2 * third, 3 * third, 3 * third]})  # fmt: skip
        common = dict(depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                      patch_size=vision["patch_size"], spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
        if model_type == "qwen2_vl":
            tower = dict(common, embed_dim=vision["hidden_size"], hidden_size=text["hidden_size"],
                         mlp_ratio=vision["intermediate_size"] // vision["hidden_size"])  # fmt: skip
            config, model = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        else:  # windows of 4x4 merged tokens, as Qwen2.5-VL's 112 px at 14-px patches; the last block sees all
            tower = dict(common, hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                         out_hidden_size=text["hidden_size"], window_size=8 * vision["patch_size"],
                         fullatt_block_indexes=[vision["num_hidden_layers"] - 1])  # fmt: skip
            config, model = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        cfg = config(vision_config=tower, text_config=lm, image_token_id=image_id, video_token_id=image_id - 1,
                     vision_start_token_id=image_id - 2, vision_end_token_id=image_id - 3,
                     tie_word_embeddings=True)  # fmt: skip
        return model(cfg)

    return build


def llava_rules(cfg: VLMConfig, names: set[str]) -> tuple[list[Rule], str]:
    """Return LLaVA's (or LLaVA-NeXT's) key map for the tensor names transformers wrote, and its head's name."""
    layout = llava_layout(names)
    return llava_key_map(cfg, layout), f"{layout.head}.weight"


def one_image(model: VisionLanguageModel, batch: int, pixels: torch.Tensor) -> tuple[int, dict, dict]:
    """LLaVA-1.5: one image per prompt, the same pixels on both sides."""
    return model.image_tokens, {"pixel_values": pixels}, {"pixel_values": pixels}


def tiled_anyres(model: VisionLanguageModel, batch: int, pixels: torch.Tensor) -> tuple[int, dict, dict]:
    """LLaVA-NeXT: a square image twice the tile side, so a 2x2 grid; transformers takes [B, views, 3, S, S]."""
    side = GRID * model.cfg.vision.image_size
    sizes = torch.tensor([[side, side]] * batch)
    theirs = {"pixel_values": pixels.unflatten(0, (batch, -1)), "image_sizes": sizes}
    return model.anyres.num_tokens(side, side), theirs, {"pixel_values": pixels, "image_sizes": sizes}


def split_views(model: VisionLanguageModel, batch: int, pixels: torch.Tensor) -> tuple[int, dict, dict]:
    """Idefics3: 2x2 tiles and the global view per image, each its own row of image tokens."""
    views = pixels.unflatten(0, (batch, -1))  # [B, views, 3, S, S]
    mask = torch.ones(*views.shape[:2], *views.shape[3:], dtype=torch.long)  # no padded view
    theirs = {"pixel_values": views, "pixel_attention_mask": mask}
    return views.shape[1] * model.image_tokens, theirs, {"pixel_values": pixels}


def native_resolution(model: Qwen2VLModel, batch: int, pixels: torch.Tensor) -> tuple[int, dict, dict]:
    """Qwen2-VL: each image as Qwen's processor packs it, [h·w, C·t·p·p] patches (the still frame twice) with
    its grid (t, h, w); M-RoPE needs transformers to be told which tokens are the image's."""
    v = model.cfg.vision
    p, m = v.patch_size, v.merge_size
    side = pixels.shape[-1] // p
    frames = pixels[:, :, None].expand(-1, -1, v.temporal_patch_size, -1, -1)  # [B, C, t, S, S]
    # [B, C, t, h/m, m, p, w/m, m, p] -> [B, h/m, w/m, m, m, C, t, p, p]: merge groups adjacent, as the processor
    grouped = frames.reshape(batch, v.channels, v.temporal_patch_size, side // m, m, p, side // m, m, p)
    patches = grouped.permute(0, 3, 6, 4, 7, 1, 2, 5, 8).reshape(batch * side * side, -1)
    grid = torch.tensor([[1, side, side]] * batch)
    theirs = {"pixel_values": patches, "image_grid_thw": grid}
    return side * side // m**2, theirs, {"pixel_values": patches, "image_grid": grid}


def qwen_rules(cfg, names: set[str]) -> tuple[list[Rule], str]:
    """Return Qwen2-VL's key map for transformers' tensor names, and its (tied) head's name."""
    return qwen2_vl_key_map(cfg), "lm_head.weight"


FAMILIES = {
    "llava": Family(llava_reference, vlm_config_from_llava, llava_rules, one_image, 1),
    "llava_next": Family(llava_next_reference, vlm_config_from_llava, llava_rules, tiled_anyres, 1 + GRID**2),
    "idefics3": Family(idefics3_reference, vlm_config_from_idefics3,
                       lambda cfg, names: (idefics3_key_map(cfg), "lm_head.weight"), split_views, 1 + GRID**2),
    "qwen2_vl": Family(qwen_reference("qwen2_vl"), qwen2_vl_config_from_hf, qwen_rules, native_resolution, 1,
                       GRID, Qwen2VLModel),
    "qwen2_5_vl": Family(qwen_reference("qwen2_5_vl"), qwen2_vl_config_from_hf, qwen_rules, native_resolution, 1,
                         GRID, Qwen2VLModel),
    "gemma3": Family(gemma3_reference, gemma3_config_from_hf, gemma3_rules, one_image, 1, model=Gemma3Model,
                     marks=image_blocks),
    "blip2": Family(blip2_reference, vlm_config_from_blip2, lambda cfg, names: (blip2_vlm_key_map(cfg),
                    "language_model.lm_head.weight"), one_image, 1, prompt=images_then_text,
                    reference_images=lambda ref, images: ref.get_image_features(**images), dropped=TEXT_ONLY),
    "idefics": Family(idefics_reference, vlm_config_from_idefics, untied_rules(lambda cfg: idefics_key_map(cfg, 2)),
                      cross_attended, 1, prompt=between_markers, marks=latest_image,
                      reference_images=idefics_images),
    "chameleon": Family(chameleon_reference, chameleon_config_from_hf, lambda cfg, names: (
                        chameleon_key_map(cfg), "lm_head.weight"), vq_coded, 1, model=ChameleonModel,
                        reference_images=lambda ref, images: ref.model.get_image_tokens(**images),
                        prepare=spliced),
}  # fmt: skip


def build_models(family: str, shapes: str, seed: int = 0):
    """Return (transformers model, mmlm VisionLanguageModel) of `family` holding the same random weights."""
    vision, text = SHAPES[shapes]
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    ref = spec.reference(vision, text, text["vocab_size"] - 1).eval()
    cfg = spec.config(ref.config.to_dict())
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    rules, head = spec.key_map(cfg, set(weights))
    if head:
        weights.pop(head, None)  # tied to the embedding
    for name in [k for k in weights if spec.dropped and spec.dropped.match(k)]:
        del weights[name]
    ours = build_from_weights(lambda: spec.model(cfg), weights, rules, family)
    ours.lm.prepare_for_inference()  # what mmlm.load does on CPU
    return ref, ours


@dataclass
class Inputs:
    """One batch of prompts as each side takes it."""

    ids: torch.Tensor  # [B, T]: bos, image tokens, text
    theirs: dict  # transformers generate's image arguments
    ours: dict  # mmlm prepare's image arguments
    family: str
    marks: tuple[str, ...] = ()  # keys of `theirs` that mark the prompt's image tokens, not images


def bos_image_text(batch: int, image_tokens: int, text: torch.Tensor, image_id: int) -> torch.Tensor:
    """Most families: bos, the image's tokens, the text."""
    image = torch.full((batch, image_tokens), image_id)
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], 1)


def make_inputs(family: str, model: VisionLanguageModel, batch: int, shapes: str) -> Inputs:
    """Return `batch` prompts of one random image (cut as the family cuts it) and random text."""
    g = torch.Generator().manual_seed(batch)
    spec, image_id = FAMILIES[family], model.cfg.image_token_id
    size = spec.side * SHAPES[shapes][0]["image_size"]
    pixels = torch.randn(batch * spec.views, 3, size, size, generator=g)
    image_tokens, theirs, ours = spec.images(model, batch, pixels)
    text = torch.randint(3, image_id, (batch, TEXT_TOKENS), generator=g)
    ids = (spec.prompt or bos_image_text)(batch, image_tokens, text, image_id)
    marks = spec.marks(ids, image_id) if spec.marks else {}
    if "image_grid_thw" in theirs:  # transformers' M-RoPE finds the image tokens by this mask, not by id
        marks["mm_token_type_ids"] = (ids == image_id).int()
    return Inputs(ids, {**theirs, **marks}, ours, family, tuple(marks))


def transformers_run(model, inputs: Inputs, new_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Return the call's start and each new token's arrival time, and the tokens, in transformers' generate."""
    clock = StepClock()
    start = now()
    out = model.generate(input_ids=inputs.ids, attention_mask=torch.ones_like(inputs.ids), **inputs.theirs,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         stopping_criteria=transformers.StoppingCriteriaList([clock]),
                         **transformers_cache_settings(FAMILIES[inputs.family].cache))  # fmt: skip
    assert out.shape[1] == inputs.ids.shape[1] + new_tokens
    return [start, *clock.times], out[:, inputs.ids.shape[1] :].tolist()


def ours_prepare(model, inputs: Inputs) -> tuple[torch.Tensor, object]:
    """Return mmlm's prompt embeddings and media for `inputs` (the family's prepare, or the model's)."""
    prepare = FAMILIES[inputs.family].prepare
    return prepare(model, inputs.ids, inputs.ours) if prepare else model.prepare(inputs.ids, **inputs.ours)


def mmlm_run(model, inputs: Inputs, new_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Return the call's start and each new token's arrival time, and the tokens, in mmlm's greedy generation."""
    start = now()
    embeds, media = ours_prepare(model, inputs)
    batch, length = inputs.ids.shape
    static = FAMILIES[inputs.family].cache == "static"
    cache = model.new_cache(batch, length + new_tokens if static else None, media)  # static: preallocated
    times, tokens = [start], [[] for _ in range(batch)]
    for step in generate_ids(vlm_step(model), cache, GenerationSettings(new_tokens), [], None, embeds):
        times.append(now())
        for row, token in step:
            tokens[row].append(token)
    assert len(times) == new_tokens + 1
    return times, tokens


def rates(run, model, inputs: Inputs, new_tokens: int) -> tuple[float, float]:
    """Return (decode tokens/s: batch / median step between new tokens, prefill seconds to the first token)."""
    times, _ = run(model, inputs, new_tokens)
    steps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    return inputs.ids.shape[0] / statistics.median(steps), times[1] - times[0]


def image_seconds(ref, ours, inputs: Inputs, rounds: int) -> dict[str, list[float]]:
    """Return each side's seconds to turn the batch's images into LM-width tokens, over alternating rounds:
    transformers' get_image_features, mmlm's prepare (which also embeds the prompt and fills its image slots)."""

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def measure() -> float:
            start = now()
            fn()
            return now() - start

        return measure

    images = {k: v for k, v in inputs.theirs.items() if k not in inputs.marks}
    theirs = FAMILIES[inputs.family].reference_images or (
        lambda model, x: model.model.get_image_features(**x)
    )
    return alternating_rounds(
        {
            "transformers": timed(lambda: theirs(ref, images)),
            "mmlm": timed(lambda: ours_prepare(ours, inputs)),
        },
        rounds,
    )


def measure(family: str, shapes: str, batches: list[int], new_tokens: int, rounds: int) -> None:
    """Print one JSON line per batch size for `family`: both sides' decode rate, prefill time and the ratios."""
    ref, ours = build_models(family, shapes)
    runs = {"transformers": (transformers_run, ref), "mmlm": (mmlm_run, ours)}
    for batch in batches:
        inputs = make_inputs(family, ours, batch, shapes)
        warm = {name: run(model, inputs, 8) for name, (run, model) in runs.items()}  # untimed
        ids = inputs.ids
        theirs = ref(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs.theirs).logits
        logit_gap = (ours(ids, **inputs.ours).logits - theirs).abs().max().item()
        measured = alternating_rounds(
            {
                name: lambda r=run, m=model, x=inputs: rates(r, m, x, new_tokens)
                for name, (run, model) in runs.items()
            },
            rounds,
        )
        images = image_seconds(ref, ours, inputs, rounds)
        decode = {name: [tok_s for tok_s, _ in r] for name, r in measured.items()}
        prefill = {name: [first for _, first in r] for name, r in measured.items()}
        med = {name: statistics.median(r) for name, r in decode.items()}
        first = {name: statistics.median(p) for name, p in prefill.items()}
        print(json.dumps({
            "family": family, "batch": batch, "prompt_tokens": inputs.ids.shape[1],
            "image_tokens": int((inputs.ids == ours.cfg.image_token_id).sum()) // batch,
            "new_tokens": new_tokens, "rounds": rounds, "cache": FAMILIES[family].cache, "tok_s": {n: spread(r, 2) for n, r in decode.items()},
            "ratio": round(med["mmlm"] / med["transformers"], 3),
            "prefill_s": {n: spread(p, 4) for n, p in prefill.items()},
            "prefill_ratio": round(first["transformers"] / first["mmlm"], 3),  # > 1: mmlm's first token sooner
            "image_s": {n: spread(t, 4) for n, t in images.items()},  # tower + connector, part of the prefill
            "same_tokens": warm["mmlm"][1] == warm["transformers"][1], "max_logit_gap": float(f"{logit_gap:.1e}"),
            "load": os.getloadavg(),
        }), flush=True)  # fmt: skip


def main() -> None:
    """Run the benchmark and print one JSON line per (family, batch size)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", "--family", dest="family", nargs="+", choices=list(FAMILIES),
                        default=list(FAMILIES))  # fmt: skip
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, 2 here)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: time a user waits; cpu: the thread's CPU time, steady on a shared machine "
                             "(needs --threads 1)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="toy shapes, 1 round: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.rounds = [1], 6, 1
    torch.set_grad_enabled(False)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: run it with --threads 1")
    use_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, python {platform.python_version()}, clock {args.clock}, "
          f"load {os.getloadavg()}; KV cache: the row's cache, the same on both sides", file=sys.stderr)  # fmt: skip
    for family in args.family:
        measure(family, "tiny" if args.quick else "small", args.batch, args.new_tokens, args.rounds)


if __name__ == "__main__":
    main()
