"""transformers Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration folders <-> mmlm's
Qwen2VLModel: config and key map.

Both are a native-resolution vision tower (`model.visual.*`: a Conv3d patch embedding, blocks, `merger`) and a
Qwen2 LM with M-RoPE (`model.language_model.*`, `lm_head`). Qwen2-VL's blocks use LayerNorm and a quick-GELU MLP
(`fc1`, `fc2`); Qwen2.5-VL's RMSNorm, a biased SwiGLU MLP and windowed attention. transformers 4.x wrote the same
tensors as `visual.*` and `model.*` (the hub's files): `qwen2_vl_layout` finds which.
"""

from dataclasses import dataclass
from typing import Any

from mmlm.checkpoints.hf_llama import DEFAULTS, llama_key_map, lm_config_from_hf, lm_config_to_hf
from mmlm.checkpoints.keymap import Rule, linear, rename
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.qwen2_vl import Qwen2VLConfig
from mmlm.models.qwen2_vl_vision import Qwen2VisionConfig

MODEL_TYPES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
# transformers' Qwen2VLTextConfig defaults where they differ from Qwen2's
TEXT_DEFAULTS = dict(DEFAULTS["qwen2"], vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                     bos_token_id=151643, eos_token_id=151645, rope_theta=1000000.0)  # fmt: skip
VISION_DEFAULTS = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=4),
}  # fmt: skip


@dataclass(frozen=True)
class Qwen2VLLayout:
    """Where a checkpoint keeps the tower and the LM: transformers 5 (`model.visual`, `model.language_model`)
    or 4.x (`visual`, `model`)."""

    vision: str = "model.visual"
    lm: str = "model.language_model"


def qwen2_vl_layout(names: set[str]) -> Qwen2VLLayout:
    """Return the layout of a checkpoint's tensor names."""
    if any(n.startswith("visual.") for n in names):
        return Qwen2VLLayout("visual", "model")
    return Qwen2VLLayout()


def _text_config(hf: dict[str, Any]) -> dict[str, Any]:
    # 4.x files keep the text settings at the top level; 5.x nests them in text_config
    top = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config")}
    return {**TEXT_DEFAULTS, **top, **(hf.get("text_config") or {})}


def qwen2_vl_config_from_hf(hf: dict[str, Any], tied: bool | None = None) -> Qwen2VLConfig:
    """Return the Qwen2VLConfig of a transformers Qwen2VLConfig / Qwen2_5_VLConfig dict; `tied`: whether the
    checkpoint ties lm_head to the embeddings (None: the config's tie_word_embeddings)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise InputError(f"model_type: got {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    text = _text_config(hf)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    sections = rope.get("mrope_section", [16, 24, 24])
    theta = rope.get("rope_theta", text.get("rope_theta"))
    text.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": theta})
    text.pop("rope_scaling", None)
    if tied is not None:
        text["tie_word_embeddings"] = tied
    lm = lm_config_from_hf(text)
    lm.mrope_section = [int(s) for s in sections]
    if sum(lm.mrope_section) * 2 != lm.dim_per_head:
        raise InputError(
            f"rope_parameters.mrope_section: {lm.mrope_section} covers {2 * sum(lm.mrope_section)} channels; "
            f"expected the head dim {lm.dim_per_head}"
        )
    v = {**VISION_DEFAULTS[model_type], **(hf.get("vision_config") or {})}
    merge = int(v.get("spatial_merge_size", 2))
    common = dict(heads=v["num_heads"], patch_size=v.get("patch_size", 14), merge_size=merge,
                  temporal_patch_size=v.get("temporal_patch_size", 2), layers=v["depth"], act=v["hidden_act"],
                  channels=v.get("in_channels", v.get("in_chans", 3)),
                  rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)))  # fmt: skip
    if model_type == "qwen2_vl":
        vision = Qwen2VisionConfig(
            width=v["embed_dim"], mlp_dim=int(v["embed_dim"] * v["mlp_ratio"]), **common
        )
        norm = "layer"
    else:
        vision = Qwen2VisionConfig(width=v["hidden_size"], mlp_dim=v["intermediate_size"], norm="rms",
                                   gated_mlp=True, window_size=v["window_size"],
                                   full_attention_blocks=list(v["fullatt_block_indexes"]), **common)  # fmt: skip
        norm = "rms"
    return Qwen2VLConfig(
        vision=vision, lm=lm, connector=ConnectorConfig(kind="patch_merger", scale_factor=merge, norm=norm),
        image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        tokens_per_second=None if model_type == "qwen2_vl" else float(v["tokens_per_second"]),
    )  # fmt: skip


def qwen2_vl_config_to_hf(cfg: Qwen2VLConfig) -> dict[str, Any]:
    """Return a transformers Qwen2VLConfig or Qwen2_5_VLConfig dict (by the tower's kind) for `cfg`."""
    v, lm = cfg.vision, cfg.lm
    text = lm_config_to_hf(lm, "qwen2")
    for key in ("architectures", "model_type"):
        text.pop(key)
    text["rope_parameters"]["mrope_section"] = list(lm.mrope_section)
    common = dict(depth=v.layers, num_heads=v.heads, hidden_act=v.act, in_channels=v.channels,
                  patch_size=v.patch_size, spatial_merge_size=v.merge_size, temporal_patch_size=v.temporal_patch_size,
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})  # fmt: skip
    if v.gated_mlp:
        model_type = "qwen2_5_vl"
        vision = dict(common, hidden_size=v.width, intermediate_size=v.mlp_dim, out_hidden_size=lm.width,
                      window_size=v.window_size, fullatt_block_indexes=list(v.full_attention_blocks),
                      tokens_per_second=_whole(cfg.tokens_per_second if cfg.tokens_per_second is not None else 4))  # fmt: skip
    else:
        model_type = "qwen2_vl"
        if v.mlp_dim % v.width:
            raise InputError(
                f"vision.mlp_dim: {v.mlp_dim} is not a whole multiple of the width {v.width} (mlp_ratio)"
            )
        vision = dict(common, embed_dim=v.width, hidden_size=lm.width, mlp_ratio=v.mlp_dim // v.width)
    return dict(
        model_type=model_type, architectures=[MODEL_TYPES[model_type]], text_config=text, vision_config=vision,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, tie_word_embeddings=lm.tie_word_embeddings,
    )  # fmt: skip


def _whole(value: float) -> int | float:
    """Return `value` as an int when it is whole (transformers' config types tokens_per_second as int)."""
    return int(value) if float(value).is_integer() else value


def qwen2_vl_key_map(cfg: Qwen2VLConfig, layout: Qwen2VLLayout = Qwen2VLLayout()) -> list[Rule]:
    """Return every rule between a Qwen2-VL / Qwen2.5-VL checkpoint's tensor names and Qwen2VLModel's."""
    v, t = cfg.vision, layout.vision
    layer_norm = v.norm == "layer"
    # transformers' Conv3d kernel [Dv, C, t, p, p] flattened is our patch Linear [Dv, C·t·p·p]
    kernel = (v.width, v.channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    rules = [rename("vision.patch_embed.weight", f"{t}.patch_embed.proj.weight", their_shape=kernel)]
    mlp = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")) if v.gated_mlp else (("fc1", "fc1"), ("fc2", "fc2"))  # fmt: skip
    for i in range(v.layers):
        o, b = f"vision.blocks.{i}", f"{t}.blocks.{i}"
        rules += linear(f"{o}.norm1", f"{b}.norm1", layer_norm) + linear(
            f"{o}.norm2", f"{b}.norm2", layer_norm
        )
        rules += linear(f"{o}.attn.qkv", f"{b}.attn.qkv") + linear(f"{o}.attn.out", f"{b}.attn.proj")
        for ours, theirs in mlp:
            rules += linear(f"{o}.mlp.{ours}", f"{b}.mlp.{theirs}")
    rules += linear("connector.norm", f"{t}.merger.ln_q", cfg.connector.norm == "layer")
    rules += linear("connector.mlp.fc1", f"{t}.merger.mlp.0") + linear(
        "connector.mlp.fc2", f"{t}.merger.mlp.2"
    )

    def theirs(name: str) -> str:
        return name if name.startswith("lm_head.") else layout.lm + name[len("model") :]

    for rule in llama_key_map(cfg.lm):
        rules.append(Rule(tuple(f"lm.{n}" for n in rule.ours), tuple(map(theirs, rule.theirs)), rule.sizes,
                          rule.their_shape, rule.transpose))  # fmt: skip
    return rules
