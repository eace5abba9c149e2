"""transformers LlavaForConditionalGeneration folders <-> mmlm's VisionLanguageModel: config and key map.

A LLaVA checkpoint is a CLIP or SigLIP vision tower, LLaVA-1.5's two-layer projector and a Llama-family LM,
each stored under a prefix. The prefixes depend on who wrote the file: the hub's LLaVA-1.5 checkpoints use
`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`;
transformers 5 writes `vision_tower.*` (no `vision_model.`) and may also use `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*` and `lm_head.*`. `llava_layout` reads which one a
file uses from its tensor names; the rules are the CLIP/SigLIP and Llama maps with those prefixes.

LLaVA-NeXT (LlavaNextForConditionalGeneration, model_type "llava_next") is the same checkpoint plus one tensor,
`image_newline` [D_lm] (`model.image_newline` in transformers 5's layout), and a config with the anyres grids
(`image_grid_pinpoints`); mmlm reads it as a VLMConfig with patch_merge "spatial_unpad" (mmlm.models.anyres).
"""

from dataclasses import dataclass
from typing import Any

from mmlm.checkpoints.hf_clip import (
    clip_vision_config_from_hf,
    clip_vision_key_map,
    siglip_vision_config_from_hf,
    siglip_vision_key_map,
    vision_config_to_hf,
)
from mmlm.checkpoints.hf_llama import hf_model_type, llama_key_map, lm_config_from_hf, lm_config_to_hf
from mmlm.checkpoints.keymap import Rule, linear, rename
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.vlm import VLMConfig


@dataclass(frozen=True)
class LlavaLayout:
    """Where each part's tensors live in a LLaVA checkpoint."""

    vision: str  # e.g. "vision_tower.vision_model"
    projector: str  # e.g. "multi_modal_projector"
    lm: str  # replaces the "model" of a Llama checkpoint's names, e.g. "language_model.model"
    head: str  # replaces its "lm_head", e.g. "language_model.lm_head"
    newline: str = "image_newline"  # LLaVA-NeXT's row separator, e.g. "model.image_newline"


HUB_LAYOUT = LlavaLayout("vision_tower.vision_model", "multi_modal_projector", "language_model.model",
                         "language_model.lm_head")  # fmt: skip
# LlavaNextConfig's default grids (llava-v1.6 at 336 px): 1x2, 2x1, 2x2, 3x1 and 1x3 tiles
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_layout(names: set[str]) -> LlavaLayout:
    """Return the prefixes a LLaVA checkpoint with these tensor names uses."""
    nested = "model." if any(n.startswith("model.language_model.") for n in names) else ""
    vision = f"{nested}vision_tower"
    if any(n.startswith(f"{vision}.vision_model.") for n in names):
        vision += ".vision_model"
    if nested:
        return LlavaLayout(vision, "model.multi_modal_projector", "model.language_model", "lm_head",
                           "model.image_newline")  # fmt: skip
    return LlavaLayout(vision, "multi_modal_projector", "language_model.model", "language_model.lm_head")


def vlm_config_from_llava(hf: dict[str, Any]) -> VLMConfig:
    """Return the VLMConfig of a transformers LlavaConfig or LlavaNextConfig dict (CLIP or SigLIP tower,
    Llama-family LM)."""
    vision = hf.get("vision_config") or {"model_type": "clip_vision_model"}
    kind = vision.get("model_type", "clip_vision_model")
    if kind == "clip_vision_model":
        vision_cfg = clip_vision_config_from_hf(vision)
    elif kind == "siglip_vision_model":
        vision_cfg = siglip_vision_config_from_hf(vision)
    else:
        raise InputError(f"vision_config.model_type {kind!r}: mmlm reads LLaVA with a CLIP or SigLIP tower")
    text = {"model_type": "llama", **(hf.get("text_config") or {})}
    layers = hf.get("vision_feature_layer", -2)
    select = hf.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise InputError(f"vision_feature_select_strategy: got {select!r}; mmlm reads 'default' or 'full'")
    llava_next = hf.get("model_type") == "llava_next"
    pinpoints = (hf.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS) if llava_next else []
    if not all(
        isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pinpoints
    ):
        raise InputError(f"image_grid_pinpoints: got {pinpoints!r}; expected a list of [height, width] pairs")
    return VLMConfig(
        vision=vision_cfg,
        lm=lm_config_from_hf(text),
        connector=ConnectorConfig(kind="mlp", act=hf.get("projector_hidden_act", "gelu"),
                                  bias=hf.get("multimodal_projector_bias", True)),
        image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
        feature_layers=list(layers) if isinstance(layers, list | tuple) else [layers],
        feature_select=select,
        patch_merge="spatial_unpad" if llava_next else "flat",
        image_grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints],
    )  # fmt: skip


def llava_config_to_hf(cfg: VLMConfig, lm_type: str) -> dict[str, Any]:
    """Return a transformers LlavaConfig dict for `cfg` (LlavaNextConfig for patch_merge spatial_unpad)."""
    layers = cfg.feature_layers[0] if len(cfg.feature_layers) == 1 else list(cfg.feature_layers)
    if cfg.patch_merge == "spatial_unpad":
        family = dict(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                      image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])  # fmt: skip
    else:
        family = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"])
    return dict(
        **family,
        vision_config=vision_config_to_hf(cfg.vision), text_config=lm_config_to_hf(cfg.lm, lm_type),
        image_token_index=cfg.image_token_id, projector_hidden_act=cfg.connector.act,
        multimodal_projector_bias=cfg.connector.bias is not False, vision_feature_layer=layers,
        vision_feature_select_strategy=cfg.feature_select, image_seq_length=cfg.patches,
        tie_word_embeddings=cfg.lm.tie_word_embeddings,
    )  # fmt: skip


def llava_lm_type(cfg: VLMConfig) -> str | None:
    """Return the transformers LM model_type (llama, mistral, qwen2) that represents cfg.lm, or None if LLaVA
    can't."""
    for lm_type in ("llama", "mistral", "qwen2"):  # LLaVA's text_config is any of them (AutoModel)
        if hf_model_type(cfg.lm, prefer=lm_type) == lm_type:
            return lm_type
    return None


def llava_representable(cfg: VLMConfig) -> str | None:
    """Return the LM model_type if transformers' LLaVA holds `cfg` exactly, else None."""
    v = cfg.vision
    clip_like = v.class_token and v.pre_norm and not v.patch_bias and v.stem == "patch" and v.pool == "cls"
    siglip_like = not v.class_token and not v.pre_norm and v.patch_bias and v.stem == "patch"
    connector_ok = cfg.connector.kind == "mlp" and cfg.connector.bias is not False
    if cfg.patch_merge != ("spatial_unpad" if cfg.image_grid_pinpoints else "flat"):
        return None  # a flat merge of anyres tiles is neither LLaVA's nor LLaVA-NeXT's
    if cfg.audio is not None or not ((clip_like or siglip_like) and v.embed_dim is None and connector_ok):
        return None
    return llava_lm_type(cfg)


def llava_key_map(cfg: VLMConfig, layout: LlavaLayout = HUB_LAYOUT) -> list[Rule]:
    """Return every rule between a LLaVA checkpoint's tensor names (in `layout`) and VisionLanguageModel's."""
    vision_map = clip_vision_key_map if cfg.vision.class_token else siglip_vision_key_map
    rules = vision_map(cfg.vision, "vision", layout.vision)
    rules += linear("connector.fc1", f"{layout.projector}.linear_1", cfg.connector.bias is not False)
    rules += linear("connector.fc2", f"{layout.projector}.linear_2", cfg.connector.bias is not False)
    if cfg.patch_merge == "spatial_unpad":
        rules.append(rename("image_newline", layout.newline))

    def theirs(name: str) -> str:
        if name.startswith("lm_head."):
            return layout.head + name[len("lm_head") :]
        return layout.lm + name[len("model") :]

    for rule in llama_key_map(cfg.lm):
        rules.append(Rule(tuple(f"lm.{n}" for n in rule.ours), tuple(map(theirs, rule.theirs)), rule.sizes,
                          rule.their_shape, rule.transpose))  # fmt: skip
    return rules
