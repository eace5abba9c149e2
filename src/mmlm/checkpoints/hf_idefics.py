"""transformers IdeficsForVisionText2Text (Idefics v1, the Flamingo design) <-> mmlm's VisionLanguageModel with
cross_attention fusion: config and key maps, for the whole model and for its Perceiver and gated blocks.

The tower is CLIP's (`model.vision_model`, class token, pre-LayerNorm); its last block's tokens, class token
included and without the post-LayerNorm, go to the resampler (or, with use_resampler false, straight to the
gated blocks). The LM is Llama's under `model.*`, with a gated block before every cross_layer_interval-th layer.
Idefics' decoupled embedding and head keep the additional_vocab_size extra tokens (`<fake_token_around_image>`,
`<image>`) in separate tensors (`embed_tokens.additional_embedding`, `lm_head.additional_fc`); here they are the
last rows of one embedding and one head. The `<image>` slot keeps that token's own embedding (no learned marker).

Idefics stores the resampler under `model.perceiver_resampler` and the gated blocks under
`model.gated_cross_attn_layers.{i}`; pass those as `theirs`. Their separate k/v projections become our fused `kv`
(k rows first); a vector α is [1, 1, D] in Idefics and [D] here.
"""

from typing import Any

from mmlm.checkpoints.hf_clip import clip_vision_config_from_hf, clip_vision_key_map
from mmlm.checkpoints.hf_llama import hf_model_type, llama_key_map, lm_config_from_hf, lm_config_to_hf
from mmlm.checkpoints.keymap import Rule, fused, linear, rename
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.vlm import VLMConfig

VISION = "model.vision_model"
# transformers' IdeficsVisionConfig and IdeficsPerceiverConfig defaults, for keys a config.json leaves out
VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32,
                       num_attention_heads=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96,
                          qk_layer_norms_perceiver=False)  # fmt: skip
TOP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")  # fmt: skip


def vlm_config_from_idefics(
    hf: dict[str, Any], image_token_id: int | None = None, end_of_document_id: int | None = None
) -> VLMConfig:
    """Return the VLMConfig of a transformers IdeficsConfig dict. `image_token_id`: the tokenizer's `<image>` (the
    config has none; None: the last added token, as in idefics-9b); `end_of_document_id`: the tokenizer's eos,
    after which text sees no image (None: the config's eos_token_id)."""
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    vision["hidden_size"] = vision.pop("embed_dim")
    perceiver = {**PERCEIVER_DEFAULTS, **(hf.get("perceiver_config") or {})}
    text = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-6, "pad_token_id": 0,
            **{k: hf[k] for k in TOP_KEYS if k in hf}}  # fmt: skip
    extra = int(hf.get("additional_vocab_size", 0))
    text["vocab_size"] = text.get("vocab_size", 32000) + extra
    text["num_key_value_heads"] = text.get("num_attention_heads", 32)
    lm = lm_config_from_hf(text)
    interval = hf.get("cross_layer_interval", 1)
    if not isinstance(interval, int) or interval < 1 or lm.layers % interval:
        raise InputError(
            f"cross_layer_interval: got {interval!r}; expected a positive divisor of num_hidden_layers ({lm.layers})"
        )
    alpha_type = hf.get("alpha_type", "float")
    if alpha_type not in ("float", "vector"):
        raise InputError(f"alpha_type: got {alpha_type!r}; expected 'float' or 'vector'")
    vision_cfg = clip_vision_config_from_hf(vision)
    eod = end_of_document_id if end_of_document_id is not None else (lm.eos_token_ids or [None])[0]
    image = image_token_id if image_token_id is not None else lm.vocab_size - 1
    connector = ConnectorConfig(
        kind="cross_attention", num_queries=perceiver["resampler_n_latents"], depth=perceiver["resampler_depth"],
        heads=perceiver["resampler_n_heads"], head_dim=perceiver["resampler_head_dim"],
        mlp_dim=4 * vision_cfg.width, cross_attn_every_n_layers=interval, alpha_type=alpha_type,
        qk_norm=bool(hf.get("qk_layer_norms", False)), resampler_qk_norm=bool(perceiver["qk_layer_norms_perceiver"]),
        resampler=bool(hf.get("use_resampler", False)), marker_token_id=image, media_reset_token_id=eod,
        initializer_range=lm.initializer_range,
    )  # fmt: skip
    return VLMConfig(vision=vision_cfg, lm=lm, connector=connector, image_token_id=image, feature_layers=[-1],
                     feature_select="full", feature_norm=False)  # fmt: skip


def idefics_representable(cfg: VLMConfig) -> bool:
    """Return whether transformers' Idefics holds `cfg` exactly (CLIP tower read whole, its fusion, Llama LM)."""
    v, c = cfg.vision, cfg.connector
    tower = v.class_token and v.pre_norm and not v.patch_bias and v.stem == "patch" and v.embed_dim is None
    features = (
        cfg.feature_layers in ([-1], [v.layers]) and cfg.feature_select == "full" and not cfg.feature_norm
    )
    fusion = (c.kind == "cross_attention" and c.marker_token_id == cfg.image_token_id and c.max_frames == 0
              and (not c.resampler or c.mlp_dim in (None, 4 * v.width)))  # fmt: skip
    lm = cfg.lm.kv_heads == cfg.lm.heads and hf_model_type(cfg.lm, prefer="llama") == "llama"
    return (tower and not v.merge_tokens and features and fusion and lm and cfg.audio is None
            and cfg.video_pool == 1 and cfg.patch_merge == "flat")  # fmt: skip


def idefics_config_to_hf(cfg: VLMConfig, additional_vocab_size: int = 2) -> dict[str, Any]:
    """Return a transformers IdeficsConfig dict for `cfg`, its last `additional_vocab_size` tokens decoupled."""
    v, c, lm = cfg.vision, cfg.connector, cfg.lm
    text = lm_config_to_hf(lm, "llama")
    for key in (
        "model_type",
        "architectures",
        "num_key_value_heads",
        "head_dim",
        "attention_bias",
        "mlp_bias",
    ):
        text.pop(key, None)
    vision = dict(embed_dim=v.width, image_size=v.image_size, intermediate_size=v.mlp_dim, patch_size=v.patch_size,
                  num_hidden_layers=v.layers, num_attention_heads=v.heads, num_channels=v.channels,
                  hidden_act=v.act, layer_norm_eps=v.norm_eps)  # fmt: skip
    perceiver = dict(use_resampler=c.resampler, resampler_n_latents=c.num_queries, resampler_depth=c.depth,
                     resampler_n_heads=c.heads, resampler_head_dim=c.head_dim or v.width // c.heads,
                     qk_layer_norms_perceiver=c.resampler_qk_norm)  # fmt: skip
    return dict(
        text, model_type="idefics", architectures=["IdeficsForVisionText2Text"],
        vocab_size=lm.vocab_size - additional_vocab_size, additional_vocab_size=additional_vocab_size,
        cross_layer_interval=c.cross_attn_every_n_layers, qk_layer_norms=c.qk_norm, alpha_type=c.alpha_type,
        use_resampler=c.resampler, vision_config=vision, perceiver_config=perceiver,
    )  # fmt: skip


def idefics_key_map(cfg: VLMConfig, additional_vocab_size: int) -> list[Rule]:
    """Return every rule between an IdeficsForVisionText2Text checkpoint's tensor names and VisionLanguageModel's;
    the embedding's and head's last `additional_vocab_size` rows are their decoupled tensors."""
    c, lm = cfg.connector, cfg.lm
    rules = clip_vision_key_map(cfg.vision, "vision", VISION)
    if c.resampler:
        head_dim = c.head_dim or cfg.vision.width // c.heads
        rules += idefics_perceiver_key_map(
            c.depth, c.heads, head_dim, c.resampler_qk_norm, "connector.resampler"
        )
    for i, layer in enumerate(range(0, lm.layers, c.cross_attn_every_n_layers)):
        rules += idefics_gated_cross_attention_key_map(lm.width, lm.heads, lm.dim_per_head, c.qk_norm, c.alpha_type,
                                                       f"connector.blocks.{layer}", f"model.gated_cross_attn_layers.{i}")  # fmt: skip
    sizes = (lm.vocab_size - additional_vocab_size, additional_vocab_size)
    for rule in llama_key_map(lm):
        (ours,) = rule.ours
        if additional_vocab_size and ours == "token_embed.weight":
            rules += fused("lm.token_embed", ["model.embed_tokens", "model.embed_tokens.additional_embedding"],
                           sizes, bias=False)  # fmt: skip
        elif additional_vocab_size and ours == "lm_head.weight":
            rules += fused("lm.lm_head", ["lm_head", "lm_head.additional_fc"], sizes, bias=False)
        else:
            rules.append(Rule((f"lm.{ours}",), rule.theirs, rule.sizes, rule.their_shape, rule.transpose))
    return rules


def idefics_perceiver_key_map(
    depth: int,
    heads: int,
    head_dim: int,
    qk_layer_norms: bool = False,
    ours: str = "",
    theirs: str = "model.perceiver_resampler",
) -> list[Rule]:
    """Return every rule between an `IdeficsPerceiverResampler` and our `PerceiverResampler`."""
    o_ = f"{ours}." if ours else ""
    kv = heads * head_dim
    rules = [rename(f"{o_}latents", f"{theirs}.latents")]
    for i in range(depth):
        o, t = f"{o_}layers.{i}", f"{theirs}.blocks.{i}"
        rules += linear(f"{o}.context_norm", f"{t}.0.context_layer_norm")
        rules += linear(f"{o}.latents_norm", f"{t}.0.latents_layer_norm")
        rules += linear(f"{o}.attn.q", f"{t}.0.q_proj", bias=False)
        rules += fused(f"{o}.attn.kv", [f"{t}.0.k_proj", f"{t}.0.v_proj"], (kv, kv), bias=False)
        rules += linear(f"{o}.attn.out", f"{t}.0.output_proj", bias=False)
        if qk_layer_norms:
            rules += linear(f"{o}.attn.q_norm", f"{t}.0.q_layer_norm")
            rules += linear(f"{o}.attn.k_norm", f"{t}.0.k_layer_norm")
        rules += linear(f"{o}.mlp_norm", f"{t}.1.ln")
        rules += linear(f"{o}.mlp.fc1", f"{t}.1.fc", bias=False)
        rules += linear(f"{o}.mlp.fc2", f"{t}.1.c_proj", bias=False)
    rules += linear(f"{o_}norm", f"{theirs}.layer_norm")
    return rules


def idefics_gated_cross_attention_key_map(
    dim: int,
    heads: int,
    head_dim: int,
    qk_layer_norms: bool = False,
    alpha_type: str = "float",
    ours: str = "",
    theirs: str = "model.gated_cross_attn_layers.0",
) -> list[Rule]:
    """Return every rule between an `IdeficsGatedCrossAttentionLayer` and our `GatedCrossAttentionBlock`."""
    o, t = (f"{ours}." if ours else ""), theirs
    kv = heads * head_dim
    rules = linear(f"{o}attn_norm", f"{t}.input_layernorm", bias=False)
    rules += linear(f"{o}attn.q", f"{t}.cross_attn.q_proj", bias=False)
    rules += fused(f"{o}attn.kv", [f"{t}.cross_attn.k_proj", f"{t}.cross_attn.v_proj"], (kv, kv), bias=False)
    rules += linear(f"{o}attn.out", f"{t}.cross_attn.o_proj", bias=False)
    if qk_layer_norms:
        rules += linear(f"{o}attn.q_norm", f"{t}.cross_attn.q_layer_norm", bias=False)
        rules += linear(f"{o}attn.k_norm", f"{t}.cross_attn.k_layer_norm", bias=False)
    rules += linear(f"{o}mlp_norm", f"{t}.post_attention_layernorm", bias=False)
    for ours_name, theirs_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        rules += linear(f"{o}mlp.{ours_name}", f"{t}.mlp.{theirs_name}", bias=False)
    alpha_shape = (1,) if alpha_type == "float" else (1, 1, dim)
    rules.append(rename(f"{o}alpha_attn", f"{t}.alpha_cross_attn", their_shape=alpha_shape))
    rules.append(rename(f"{o}alpha_mlp", f"{t}.alpha_dense", their_shape=alpha_shape))
    return rules
