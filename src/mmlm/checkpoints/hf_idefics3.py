"""transformers Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration folders <-> mmlm's
VisionLanguageModel: config and key map.

Both are a SigLIP-style tower (`model.vision_model.*`, no pooling head, read after its post_layernorm), a pixel
shuffle by `scale_factor` then one bias-free Linear (`model.connector.modality_projection.proj`), and a Llama LM
(`model.text_model.*`, `lm_head`). SmolVLM is Idefics3 with another name (its modeling differs only in how
transformers merges the image features, to the same result). The tower's positions are Idefics3's bucketed ones
(VisionConfig.positions = "bucket").
"""

from typing import Any

from mmlm.checkpoints.hf_clip import (
    SIGLIP_VISION_DEFAULTS,
    siglip_vision_config_from_hf,
    siglip_vision_key_map,
)
from mmlm.checkpoints.hf_llama import hf_model_type, llama_key_map, lm_config_from_hf, lm_config_to_hf
from mmlm.checkpoints.keymap import Rule, rename
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.vlm import VLMConfig

MODEL_TYPES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
VISION = "model.vision_model"
# transformers' Idefics3VisionConfig defaults (google/siglip-so400m-patch14 widths, patch 32, 224 px)
VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                       image_size=224, patch_size=32, vision_use_head=False)  # fmt: skip


def vlm_config_from_idefics3(hf: dict[str, Any], tied: bool | None = None) -> VLMConfig:
    """Return the VLMConfig of a transformers Idefics3Config / SmolVLMConfig dict; `tied`: whether the checkpoint
    ties lm_head to the embeddings (None: the config's top-level tie_word_embeddings, transformers 5's rule)."""
    vision = {
        **SIGLIP_VISION_DEFAULTS,
        **VISION_DEFAULTS,
        **(hf.get("vision_config") or {}),
        "vision_use_head": False,
    }
    text = {"model_type": "llama", "rms_norm_eps": 1e-5, **(hf.get("text_config") or {})}
    if tied is None:
        tied = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    text["tie_word_embeddings"] = tied
    scale = hf.get("scale_factor", 2)
    if not isinstance(scale, int) or scale < 1:
        raise InputError(f"scale_factor: got {scale!r}; expected a positive integer")
    vision_cfg = siglip_vision_config_from_hf(vision)
    vision_cfg.positions = "bucket"
    return VLMConfig(
        vision=vision_cfg, lm=lm_config_from_hf(text),
        connector=ConnectorConfig(kind="pixel_shuffle", scale_factor=scale, bias=False),
        image_token_id=hf.get("image_token_id", 128257), feature_layers=[-1], feature_select="full",
        feature_norm=True,
    )  # fmt: skip


def idefics3_representable(cfg: VLMConfig) -> bool:
    """Return whether transformers' Idefics3 holds `cfg` exactly (tower, features read, connector, Llama LM)."""
    v, c = cfg.vision, cfg.connector
    tower = (
        not v.class_token and not v.pre_norm and v.patch_bias and v.stem == "patch" and v.embed_dim is None
    )
    features = cfg.feature_layers in ([-1], [v.layers]) and cfg.feature_select == "full" and cfg.feature_norm
    connector = c.kind == "pixel_shuffle" and c.bias is False
    return (tower and v.positions == "bucket" and not v.merge_tokens and features and connector
            and cfg.audio is None and cfg.video_pool == 1 and hf_model_type(cfg.lm, prefer="llama") == "llama")  # fmt: skip


def idefics3_config_to_hf(cfg: VLMConfig, model_type: str = "idefics3") -> dict[str, Any]:
    """Return a transformers Idefics3Config (or SmolVLMConfig) dict for `cfg`."""
    v = cfg.vision
    vision = dict(model_type=f"{model_type}_vision", hidden_size=v.width, intermediate_size=v.mlp_dim,
                  num_hidden_layers=v.layers, num_attention_heads=v.heads, num_channels=v.channels,
                  image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.norm_eps)  # fmt: skip
    return dict(
        model_type=model_type, architectures=[MODEL_TYPES[model_type]], vision_config=vision,
        text_config=lm_config_to_hf(cfg.lm, "llama"), image_token_id=cfg.image_token_id,
        scale_factor=cfg.connector.scale_factor, tie_word_embeddings=cfg.lm.tie_word_embeddings,
    )  # fmt: skip


def idefics3_key_map(cfg: VLMConfig) -> list[Rule]:
    """Return every rule between an Idefics3 / SmolVLM checkpoint's tensor names and VisionLanguageModel's."""
    rules = siglip_vision_key_map(cfg.vision, "vision", VISION)
    rules.append(rename("connector.proj.weight", "model.connector.modality_projection.proj.weight"))

    def theirs(name: str) -> str:
        return name if name.startswith("lm_head.") else "model.text_model" + name[len("model") :]

    for rule in llama_key_map(cfg.lm):
        rules.append(Rule(tuple(f"lm.{n}" for n in rule.ours), tuple(map(theirs, rule.theirs)), rule.sizes,
                          rule.their_shape, rule.transpose))  # fmt: skip
    return rules
