"""transformers Gemma3ForConditionalGeneration and Gemma3ForCausalLM folders <-> mmlm's Gemma3Model / DecoderLM.

The LM is DecoderLM with Gemma's options (see models/decoder_lm.py). Its tensors are Llama's plus per-head q/k
norms and two more norms per layer: Gemma's input_layernorm is our norm1, post_attention_layernorm our
post_attn_norm (on the attention output, not before the MLP as in Llama), pre_feedforward_layernorm our norm2,
post_feedforward_layernorm our post_mlp_norm. The image-text checkpoint stores a SigLIP tower, the projector
(`mm_soft_emb_norm`, and `mm_input_projection_weight` [Dv, D_lm], our Linear's weight transposed) and the LM under
the prefixes `llava_layout` reads (hub files: `language_model.model.*`; transformers 5: `model.language_model.*`).

Two config fields are read as the reference reads them: Gemma3ForConditionalGeneration applies no final logit
soft-capping (only Gemma3ForCausalLM does), and neither applies `attn_logit_softcapping`.
"""

from typing import Any

from mmlm.checkpoints.hf_clip import siglip_vision_config_from_hf, siglip_vision_key_map, vision_config_to_hf
from mmlm.checkpoints.hf_llava import LlavaLayout
from mmlm.checkpoints.keymap import Rule, fused, linear, rename
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.gemma3 import Gemma3Config
from mmlm.models.vlm import VLMConfig

# Gemma3TextConfig's defaults for keys a config.json may leave out
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=None, sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
)  # fmt: skip
ROPE_TYPES = ("default", "linear")


def _rope(c: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """Return (global theta, global scaling or None, local theta) from transformers 5's per-layer-type
    rope_parameters or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = c.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or c.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    theta = float(full.pop("rope_theta", c["rope_theta"]))
    local_theta = float(local.pop("rope_theta", c["rope_local_base_freq"]))
    kind = full.pop("rope_type", full.pop("type", "default"))
    if kind not in ROPE_TYPES or local.get("rope_type", "default") != "default":
        raise InputError(
            f"rope_parameters: mmlm reads Gemma 3's rope types {ROPE_TYPES} (global), default (local)"
        )
    return theta, (None if kind == "default" else {"rope_type": kind, **full}), local_theta


def gemma3_lm_config_from_hf(text: dict[str, Any], final_softcap: bool = True) -> LMConfig:
    """Return the LMConfig of a transformers Gemma3TextConfig dict; `final_softcap` False for the image-text model,
    whose reference skips final_logit_softcapping."""
    c = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    if c.get("use_bidirectional_attention"):
        raise InputError(
            "use_bidirectional_attention: mmlm reads Gemma 3's causal LM only (not EmbeddingGemma)"
        )
    layers = c["num_hidden_layers"]
    types = c.get("layer_types") or [
        "sliding_attention" if (i + 1) % c["sliding_window_pattern"] else "full_attention"
        for i in range(layers)
    ]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise InputError(
            f"layer_types: expected {layers} of 'sliding_attention' / 'full_attention', got {types}"
        )
    theta, scaling, local_theta = _rope(c)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    eos = c.get("eos_token_id")
    return LMConfig(
        vocab_size=c["vocab_size"], width=c["hidden_size"], layers=layers, heads=c["num_attention_heads"],
        kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"], mlp_dim=c["intermediate_size"],
        act=c["hidden_activation"], norm_eps=c["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
        max_positions=c["max_position_embeddings"], tie_word_embeddings=bool(c["tie_word_embeddings"]),
        qkv_bias=bool(c["attention_bias"]), out_bias=bool(c["attention_bias"]),
        sliding_window=c["sliding_window"] if sliding else None, sliding_layers=sliding or None,
        bos_token_id=c.get("bos_token_id"), eos_token_ids=list(eos) if isinstance(eos, list) else [eos],
        pad_token_id=c.get("pad_token_id"), initializer_range=float(c["initializer_range"]), norm="rms_offset",
        embed_scale=True, sandwich_norm=True, qk_norm="rms_offset", qk_norm_eps=c["rms_norm_eps"],
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        local_rope_theta=local_theta, final_logit_softcap=c["final_logit_softcapping"] if final_softcap else None,
    )  # fmt: skip


def gemma3_lm_config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """Return a transformers Gemma3TextConfig dict for `cfg`."""
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    return dict(
        model_type="gemma3_text", vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, hidden_activation=cfg.act, max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.qkv_bias,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar), sliding_window=cfg.sliding_window or 4096,
        layer_types=["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.layers)],
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
        final_logit_softcapping=cfg.final_logit_softcap, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
        pad_token_id=cfg.pad_token_id, initializer_range=cfg.initializer_range,
    )  # fmt: skip


def _int_if_whole(value: float | None) -> float | int | None:
    # Gemma3TextConfig's strict fields type query_pre_attn_scalar as int
    return int(value) if value is not None and float(value).is_integer() else value


def gemma3_config_from_hf(hf: dict[str, Any]) -> Gemma3Config:
    """Return the Gemma3Config of a transformers Gemma3Config dict (SigLIP tower, Gemma 3 LM)."""
    vision = {"model_type": "siglip_vision_model", **(hf.get("vision_config") or {})}
    if vision["model_type"] != "siglip_vision_model":
        raise InputError(f"vision_config.model_type {vision['model_type']!r}: Gemma 3's tower is SigLIP")
    vision_cfg = siglip_vision_config_from_hf(vision)
    side = vision_cfg.image_size // vision_cfg.patch_size
    tokens = int(hf.get("mm_tokens_per_image") or 256)
    per_side = int(tokens**0.5)
    if per_side * per_side != tokens or side % per_side:
        raise InputError(
            f"mm_tokens_per_image: got {tokens}; expected a square that divides the tower's {side}x{side} grid"
        )
    return Gemma3Config(
        vision=vision_cfg,
        lm=gemma3_lm_config_from_hf(hf.get("text_config") or {}, final_softcap=False),
        connector=ConnectorConfig(kind="pooled", scale_factor=side // per_side, norm="rms_offset", bias=False,
                                  norm_eps=float(vision.get("layer_norm_eps", 1e-6))),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262_144))),
        boi_token_id=int(hf.get("boi_token_index", 255_999)),
        eoi_token_id=int(hf.get("eoi_token_index", 256_000)),
    )  # fmt: skip


def gemma3_budget_config(hf: dict[str, Any]) -> VLMConfig:
    """Return a transformers Gemma3Config dict as the VLMConfig `mmlm budget` reads: the same tower, projector
    and LM, every patch of the last layer (after the tower's final norm) reaching the projector."""
    cfg = gemma3_config_from_hf(hf)
    return VLMConfig(vision=cfg.vision, lm=cfg.lm, connector=cfg.connector, image_token_id=cfg.image_token_id,
                     feature_layers=[-1], feature_select="full", feature_norm=True)  # fmt: skip


def gemma3_config_to_hf(cfg: Gemma3Config) -> dict[str, Any]:
    """Return a transformers Gemma3Config dict for `cfg`."""
    text = gemma3_lm_config_to_hf(cfg.lm)
    text.pop("final_logit_softcapping")  # the image-text model does not apply it (module docstring)
    return dict(
        model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
        vision_config={**vision_config_to_hf(cfg.vision), "vision_use_head": cfg.vision.pool == "map"},
        text_config=text, mm_tokens_per_image=(cfg.vision.grid // cfg.connector.scale_factor) ** 2,
        image_token_index=cfg.image_token_id, boi_token_index=cfg.boi_token_id, eoi_token_index=cfg.eoi_token_id,
        tie_word_embeddings=cfg.lm.tie_word_embeddings,
    )  # fmt: skip


def gemma3_lm_key_map(cfg: LMConfig, lm: str = "model", head: str = "lm_head") -> list[Rule]:
    """Return every rule between a Gemma 3 LM's tensor names (under `lm`, head `head`) and DecoderLM's."""
    q, kv = cfg.heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    rules = [rename("token_embed.weight", f"{lm}.embed_tokens.weight")]
    norms = (("norm1", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
             ("norm2", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm"),
             ("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm"))  # fmt: skip
    for i in range(cfg.layers):
        o, t = f"blocks.{i}", f"{lm}.layers.{i}"
        rules += fused(f"{o}.attn.qkv", [f"{t}.self_attn.{p}_proj" for p in "qkv"], (q, kv, kv), cfg.qkv_bias)
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.o_proj", cfg.out_bias)
        for ours, theirs in norms:
            rules += linear(f"{o}.{ours}", f"{t}.{theirs}", bias=False)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            rules += linear(f"{o}.mlp.{ours}", f"{t}.mlp.{theirs}", bias=False)
    rules += linear("norm", f"{lm}.norm", bias=False)
    if not cfg.tie_word_embeddings:
        rules.append(rename("lm_head.weight", f"{head}.weight"))
    return rules


def gemma3_key_map(cfg: Gemma3Config, layout: LlavaLayout) -> list[Rule]:
    """Return every rule between a Gemma3ForConditionalGeneration checkpoint (in `layout`) and Gemma3Model."""
    rules = siglip_vision_key_map(cfg.vision, "vision", layout.vision)
    rules += linear("connector.norm", f"{layout.projector}.mm_soft_emb_norm", bias=False)
    rules.append(
        rename("connector.proj.weight", f"{layout.projector}.mm_input_projection_weight", transpose=True)
    )
    for rule in gemma3_lm_key_map(cfg.lm, layout.lm, layout.head):
        rules.append(Rule(tuple(f"lm.{n}" for n in rule.ours), rule.theirs, rule.sizes, rule.their_shape,
                          rule.transpose))  # fmt: skip
    return rules
