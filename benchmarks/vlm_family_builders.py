"""Gemma 3, BLIP-2 (OPT), Idefics (v1) and Chameleon for bench_vlm_families.py: how transformers builds each
from the benchmark's SigLIP and Llama shapes, and how each family's prompt and images look on both sides."""

from collections.abc import Callable

import torch
import transformers

from mmlm.checkpoints.hf_gemma3 import gemma3_key_map
from mmlm.checkpoints.hf_llava import llava_layout
from mmlm.checkpoints.keymap import Rule
from mmlm.models.chameleon import ChameleonModel
from mmlm.models.vlm import VisionLanguageModel


def lm_shapes(text: dict) -> dict:
    """Return the Llama shapes' sizes alone (no Llama-only options), as other LM configs name them."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {k: text[k] for k in keys}


def gemma3_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return Gemma 3: the SigLIP tower pooled 2x2 (64 tokens from a 64-px image), a Gemma 3 LM of the Llama
    shapes (5 sliding-window layers of window 128, then a global one; head_dim 64, tied embeddings)."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    lm = dict(lm_shapes(text), num_key_value_heads=text["num_key_value_heads"], head_dim=head_dim,
              query_pre_attn_scalar=head_dim, sliding_window=128, max_position_embeddings=2048, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)  # fmt: skip
    grid = vision["image_size"] // vision["patch_size"]
    cfg = transformers.Gemma3Config(
        text_config=lm, vision_config=dict(vision, vision_use_head=False), mm_tokens_per_image=(grid // 2) ** 2,
        image_token_index=image_id, boi_token_index=image_id - 1, eoi_token_index=image_id - 2,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Gemma3ForConditionalGeneration(cfg)


def gemma3_rules(cfg, names: set[str]) -> tuple[list[Rule], str]:
    """Return Gemma 3's key map for transformers' tensor names, and its (tied) head's name."""
    layout = llava_layout(names)
    return gemma3_key_map(cfg, layout), f"{layout.head}.weight"


def image_blocks(ids: torch.Tensor, image_id: int) -> dict:
    """Gemma 3: token_type_ids mark the image slots, which attend both ways within their image in the prompt."""
    return {"token_type_ids": (ids == image_id).long()}


def blip2_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return BLIP-2: an EVA-style tower of the SigLIP shapes, a Q-Former as wide and deep as the tower
    (cross-attention every 2nd layer) with 32 queries, and an OPT LM of the Llama shapes."""
    qformer = dict(hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
                   num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
                   cross_attention_frequency=2, encoder_hidden_size=vision["hidden_size"])  # fmt: skip
    opt = transformers.OPTConfig(**dict(lm_shapes(text), ffn_dim=text["intermediate_size"]),
                                 word_embed_proj_dim=text["hidden_size"], max_position_embeddings=2048,
                                 bos_token_id=2, eos_token_id=2, pad_token_id=1)  # fmt: skip
    cfg = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt.to_dict(),
                                   num_query_tokens=32, image_token_index=image_id)  # fmt: skip
    return transformers.Blip2ForConditionalGeneration(cfg)


def images_then_text(batch: int, image_tokens: int, text: torch.Tensor, image_id: int) -> torch.Tensor:
    """BLIP-2 (OPT): the query tokens' slots, then OPT's </s> (id 2) opening the text, as Blip2Processor."""
    return torch.cat([torch.full((batch, image_tokens), image_id), torch.full((batch, 1), 2), text], 1)


def idefics_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return Idefics (v1): a CLIP tower of the SigLIP shapes, a Perceiver resampler of 64 latents (2 layers),
    a Llama LM of the Llama shapes (no grouped KV heads, as Idefics' LM) with a gated cross-attention block
    before every 2nd layer (random gates: zero would hide the image); `<image>` is the last added token."""
    heads = vision["num_attention_heads"]
    tower = dict(embed_dim=vision["hidden_size"], image_size=vision["image_size"], patch_size=vision["patch_size"],
                 intermediate_size=vision["intermediate_size"], num_hidden_layers=vision["num_hidden_layers"],
                 num_attention_heads=heads)  # fmt: skip
    perceiver = dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=heads,
                     resampler_head_dim=vision["hidden_size"] // heads)  # fmt: skip
    cfg = transformers.IdeficsConfig(
        **dict(lm_shapes(text), vocab_size=image_id - 1), additional_vocab_size=2, max_position_embeddings=2048,
        cross_layer_interval=2, use_resampler=True, vision_config=tower, perceiver_config=perceiver,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.IdeficsForVisionText2Text(cfg)
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(0, 1.0)
            layer.alpha_dense.normal_(0, 1.0)
    return model


def untied_rules(
    key_map: Callable[[object], list[Rule]],
) -> Callable[[object, set[str]], tuple[list[Rule], None]]:
    """Return a family's rules for an LM whose head is its own tensor (nothing to drop)."""
    return lambda cfg, names: (key_map(cfg), None)


def between_markers(batch: int, image_tokens: int, text: torch.Tensor, image_id: int) -> torch.Tensor:
    """Idefics: bos, then each image's one `<image>` token between `<fake_token_around_image>`s, then the text."""
    fake = torch.full((batch, 1), image_id - 1)
    image = torch.full((batch, image_tokens), image_id)
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), fake, image, fake, text], 1)


def latest_image(ids: torch.Tensor, image_id: int) -> dict:
    """Idefics: image_attention_mask [B, T, 1], whether each position has seen the (one) image yet."""
    return {"image_attention_mask": ((ids == image_id).cumsum(1) > 0).long()[..., None]}


def cross_attended(model: VisionLanguageModel, batch: int, pixels: torch.Tensor) -> tuple[int, dict, dict]:
    """Idefics: one image per prompt, read by the gated blocks; transformers takes [B, images, 3, S, S]."""
    return 1, {"pixel_values": pixels[:, None]}, {"pixel_values": pixels}


def idefics_images(ref, images: dict) -> torch.Tensor:
    """Idefics: transformers' tower and resampler, as its forward runs them (it has no get_image_features)."""
    pixels = images["pixel_values"].flatten(0, 1)
    states = ref.model.vision_model(pixel_values=pixels).last_hidden_state
    return ref.model.perceiver_resampler(states)


def chameleon_reference(vision: dict, text: dict, image_id: int) -> transformers.PreTrainedModel:
    """Return Chameleon: a VQ-GAN coding a 64-px image as 16x16 = 256 codes of 1024 (the tiny shapes: 8x8 of
    64) and an LM of the Llama shapes with per-head q/k LayerNorm; the codes are the vocabulary's ids below
    `<image>`'s."""
    side = vision["image_size"]
    codes = 1024 if side >= 64 else 64
    vq = dict(base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1, resolution=side,
              embed_dim=64, latent_channels=64, num_embeddings=codes)  # fmt: skip
    digits = lambda code: "".join(chr(ord("A") + int(d)) for d in str(code))  # noqa: E731
    vocabulary = {"<image>": image_id, **{f"IMGIMG{digits(c)}Z": image_id - codes + c for c in range(codes)}}
    cfg = transformers.ChameleonConfig(
        **lm_shapes(text), num_key_value_heads=text["num_key_value_heads"], vq_config=vq,
        vocabulary_map=vocabulary, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.ChameleonForConditionalGeneration(cfg)


def vq_coded(model: ChameleonModel, batch: int, pixels: torch.Tensor) -> tuple[int, dict, dict]:
    """Chameleon: one image per prompt, whose `<image>` placeholders become its VQ codes' token ids."""
    return model.cfg.image_tokens, {"pixel_values": pixels}, {"pixel_values": pixels}


def spliced(model: ChameleonModel, ids: torch.Tensor, images: dict) -> tuple[torch.Tensor, None]:
    """Chameleon: the placeholders overwritten by the image's code ids, embedded as any token."""
    return model.lm.embed(model.splice(ids, images["pixel_values"])), None
