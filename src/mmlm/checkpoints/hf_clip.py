"""transformers CLIPModel and SiglipModel folders <-> mmlm's DualEncoder: config translation and key maps."""

import dataclasses
import math
from typing import Any

from mmlm.checkpoints.keymap import Rule, fused, linear, rename
from mmlm.errors import InputError
from mmlm.models.dual_encoder import DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig

# transformers' defaults for keys that older config.json files leave out
CLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)
CLIP_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)
SIGLIP_VISION_DEFAULTS = dict(
    CLIP_VISION_DEFAULTS,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)
SIGLIP_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                            layer_norm_eps=1e-6, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)  # fmt: skip


def _vision(hf: dict[str, Any], defaults: dict[str, Any], **extra: Any) -> VisionConfig:
    v = {**defaults, **hf}
    return VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        act=v["hidden_act"], norm_eps=v["layer_norm_eps"], channels=v["num_channels"], **extra,
    )  # fmt: skip


def _text(hf: dict[str, Any], defaults: dict[str, Any], **extra: Any) -> TextConfig:
    t = {**defaults, **hf}
    return TextConfig(
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], width=t["hidden_size"],
        layers=t["num_hidden_layers"], heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
        act=t["hidden_act"], norm_eps=t["layer_norm_eps"], eos_token_id=t["eos_token_id"],
        pad_token_id=t["pad_token_id"], **extra,
    )  # fmt: skip


def clip_config_from_hf(hf: dict[str, Any]) -> DualEncoderConfig:
    """Return the DualEncoderConfig of a transformers CLIPModel config.json."""
    proj = hf.get("projection_dim", 512)
    text = hf.get("text_config") or {}
    eos = text.get("eos_token_id", CLIP_TEXT_DEFAULTS["eos_token_id"])
    # transformers pools at argmax(ids) when eos_token_id == 2 (configs written before its fix), else at the first eos
    pool = "eos_argmax" if eos == 2 else "eos"
    return DualEncoderConfig(
        vision=_vision(hf.get("vision_config") or {}, CLIP_VISION_DEFAULTS, embed_dim=proj),
        text=_text(text, CLIP_TEXT_DEFAULTS, causal=True, pool=pool, padding="longest", embed_dim=proj),
        family="clip",
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
    )


def siglip_config_from_hf(hf: dict[str, Any]) -> DualEncoderConfig:
    """Return the DualEncoderConfig of a transformers SiglipModel config.json."""
    text = {**SIGLIP_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = siglip_vision_config_from_hf(hf.get("vision_config") or {})
    proj = text.get("projection_size") or text["hidden_size"]
    t = _text(text, {}, causal=False, pool="last", padding="max_length", embed_dim=proj, proj_bias=True)
    return DualEncoderConfig.siglip(v, t)


def siglip2_config_from_hf(hf: dict[str, Any]) -> DualEncoderConfig:
    """Return the DualEncoderConfig of a transformers Siglip2Model (NaFlex) config.json."""
    cfg = siglip_config_from_hf({**hf, "vision_config": {}})
    return dataclasses.replace(cfg, vision=siglip2_vision_config_from_hf(hf.get("vision_config") or {}))


def siglip2_vision_config_from_hf(hf: dict[str, Any]) -> VisionConfig:
    """Return the VisionConfig of a transformers Siglip2VisionConfig dict: NaFlex patches over a learned
    sqrt(num_patches)-square position grid."""
    num_patches = int(hf.get("num_patches", 256))
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise InputError(
            f"vision_config.num_patches: got {num_patches}; expected a square (the position grid)"
        )
    patch = int(hf.get("patch_size", SIGLIP_VISION_DEFAULTS["patch_size"]))
    v = siglip_vision_config_from_hf({**hf, "image_size": grid * patch})
    return dataclasses.replace(v, stem="linear", positions="naflex")


def clip_vision_config_from_hf(hf: dict[str, Any]) -> VisionConfig:
    """Return the VisionConfig of a transformers CLIPVisionConfig dict, without projection (a VLM's tower)."""
    return _vision(hf, CLIP_VISION_DEFAULTS, embed_dim=None)


def siglip_vision_config_from_hf(hf: dict[str, Any]) -> VisionConfig:
    """Return the VisionConfig of a transformers SiglipVisionConfig dict."""
    vision = {**SIGLIP_VISION_DEFAULTS, **hf}
    pool = "map" if vision["vision_use_head"] else "mean"
    return _vision(vision, {}, class_token=False, patch_bias=True, pre_norm=False, pool=pool, embed_dim=None)


def vision_config_to_hf(v: VisionConfig) -> dict[str, Any]:
    """Return a transformers vision_config dict (CLIP's, or SigLIP's when the tower has no class token)."""
    if v.class_token:
        return dict(_vision_hf(v), model_type="clip_vision_model")
    return dict(_vision_hf(v), model_type="siglip_vision_model", vision_use_head=v.pool == "map")


def _vision_hf(v: VisionConfig) -> dict[str, Any]:
    return dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                num_attention_heads=v.heads, num_channels=v.channels, image_size=v.image_size,
                patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.norm_eps)  # fmt: skip


def _text_hf(t: TextConfig) -> dict[str, Any]:
    return dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=t.act, layer_norm_eps=t.norm_eps, pad_token_id=t.pad_token_id,
                eos_token_id=2 if t.pool == "eos_argmax" else t.eos_token_id)  # fmt: skip


def config_to_hf(cfg: DualEncoderConfig) -> dict[str, Any]:
    """Return a transformers config.json dict (CLIPModel, SiglipModel or Siglip2Model) for `cfg`."""
    if cfg.family == "siglip":
        text = dict(_text_hf(cfg.text), projection_size=cfg.text.embed_dim)
        vision = dict(_vision_hf(cfg.vision), vision_use_head=cfg.vision.pool == "map")
        if cfg.vision.positions == "naflex":
            del vision["image_size"]
            vision["num_patches"] = cfg.vision.grid**2
            return dict(
                model_type="siglip2", architectures=["Siglip2Model"], text_config=text, vision_config=vision
            )
        return dict(
            model_type="siglip", architectures=["SiglipModel"], text_config=text, vision_config=vision
        )
    return dict(
        model_type="clip", architectures=["CLIPModel"], projection_dim=cfg.vision.embed_dim,
        logit_scale_init_value=cfg.logit_scale_init, text_config=_text_hf(cfg.text),
        vision_config=dict(_vision_hf(cfg.vision), projection_dim=cfg.vision.embed_dim),
    )  # fmt: skip


def _blocks(ours: str, theirs: str, layers: int, width: int) -> list[Rule]:
    rules = []
    for i in range(layers):
        o, t = f"{ours}.transformer.blocks.{i}", f"{theirs}.encoder.layers.{i}"
        rules += fused(f"{o}.attn.qkv", [f"{t}.self_attn.{p}_proj" for p in "qkv"], (width,) * 3)
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.out_proj")
        rules += linear(f"{o}.norm1", f"{t}.layer_norm1") + linear(f"{o}.norm2", f"{t}.layer_norm2")
        rules += linear(f"{o}.mlp.fc1", f"{t}.mlp.fc1") + linear(f"{o}.mlp.fc2", f"{t}.mlp.fc2")
    return rules


def _text_embeddings() -> list[Rule]:
    return [
        rename("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
        rename("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
        *linear("text.norm_final", "text_model.final_layer_norm"),
    ]


def clip_vision_key_map(v: VisionConfig, ours: str = "visual", theirs: str = "vision_model") -> list[Rule]:
    """Return the rules between a transformers CLIP vision tower (`theirs`) and a VisionTransformer (`ours`)."""
    return [
        rename(f"{ours}.class_token", f"{theirs}.embeddings.class_embedding"),
        rename(f"{ours}.patch_embed.weight", f"{theirs}.embeddings.patch_embedding.weight"),
        rename(f"{ours}.pos_embed", f"{theirs}.embeddings.position_embedding.weight"),
        *linear(f"{ours}.norm_pre", f"{theirs}.pre_layrnorm"),  # sic: transformers' spelling
        *_blocks(ours, theirs, v.layers, v.width),
        *linear(f"{ours}.norm_post", f"{theirs}.post_layernorm"),
    ]


def siglip_vision_key_map(v: VisionConfig, ours: str = "visual", theirs: str = "vision_model") -> list[Rule]:
    """Return the rules between a transformers SigLIP vision tower (`theirs`) and a VisionTransformer (`ours`)."""
    rules = [
        *linear(f"{ours}.patch_embed", f"{theirs}.embeddings.patch_embedding"),
        rename(f"{ours}.pos_embed", f"{theirs}.embeddings.position_embedding.weight"),
        *_blocks(ours, theirs, v.layers, v.width),
        *linear(f"{ours}.norm_post", f"{theirs}.post_layernorm"),
    ]
    if v.pool == "map":
        h, d, o = f"{theirs}.head", v.width, f"{ours}.head"
        rules += [
            rename(f"{o}.probe", f"{h}.probe"),
            # nn.MultiheadAttention packs q, k, v in one in_proj; ours keeps q apart from the fused kv
            Rule(
                (f"{o}.attn.q.weight", f"{o}.attn.kv.weight"), (f"{h}.attention.in_proj_weight",), (d, 2 * d)
            ),
            Rule((f"{o}.attn.q.bias", f"{o}.attn.kv.bias"), (f"{h}.attention.in_proj_bias",), (d, 2 * d)),
            *linear(f"{o}.attn.out", f"{h}.attention.out_proj"),
            *linear(f"{o}.norm", f"{h}.layernorm"),
            *linear(f"{o}.mlp.fc1", f"{h}.mlp.fc1"),
            *linear(f"{o}.mlp.fc2", f"{h}.mlp.fc2"),
        ]
    return rules


def clip_key_map(cfg: DualEncoderConfig) -> list[Rule]:
    """Return every rule between transformers' CLIPModel tensor names and DualEncoder's."""
    return [
        *clip_vision_key_map(cfg.vision),
        rename("visual.proj.weight", "visual_projection.weight"),
        *_text_embeddings(),
        *_blocks("text", "text_model", cfg.text.layers, cfg.text.width),
        rename("text.proj.weight", "text_projection.weight"),
        rename("logit_scale", "logit_scale"),
    ]


def siglip_key_map(cfg: DualEncoderConfig) -> list[Rule]:
    """Return every rule between transformers' SiglipModel tensor names and DualEncoder's."""
    return [
        *siglip_vision_key_map(cfg.vision),
        *_text_embeddings(),
        *_blocks("text", "text_model", cfg.text.layers, cfg.text.width),
        *linear("text.proj", "text_model.head"),
        rename("logit_scale", "logit_scale", their_shape=(1,)),
        rename("logit_bias", "logit_bias", their_shape=(1,)),
    ]
