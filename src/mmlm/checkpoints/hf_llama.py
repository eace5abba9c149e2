"""transformers LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM folders <-> mmlm's DecoderLM.

The three share one tensor layout; they differ in config only: Mistral adds a sliding window, Qwen2 biases on
q, k and v (not on o) and per-layer sliding windows. transformers' q/k weights are already permuted for the
half-split rotary pairing that `layers/rotary.py` uses, so they load unchanged.
"""

from typing import Any

import torch

from mmlm.checkpoints.keymap import Rule, fused, linear, rename
from mmlm.errors import InputError
from mmlm.models.decoder_lm import LMConfig

# transformers' defaults for keys a config.json may leave out
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    initializer_range=0.02,
)  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": LLAMA_DEFAULTS,
    "mistral": dict(LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
}  # fmt: skip
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes rope_parameters {"rope_type", "rope_theta", ...}; older files rope_theta + rope_scaling
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return float(theta), {"rope_type": kind, **params}


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _sliding(hf: dict[str, Any], model_type: str) -> tuple[int | None, list[int] | None]:
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, None
    if model_type == "mistral":
        return window, None
    # Qwen2: layer_types names each layer; older files say use_sliding_window for layers >= max_window_layers
    types = hf.get("layer_types")
    if types is None:
        if not hf.get("use_sliding_window"):
            return None, None
        types = ["sliding_attention" if i >= hf["max_window_layers"] else "full_attention"
                 for i in range(hf["num_hidden_layers"])]  # fmt: skip
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return (window, layers) if layers else (None, None)


def lm_config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """Return the LMConfig of a transformers Llama, Mistral or Qwen2 config.json."""
    model_type = hf.get("model_type")
    if model_type not in DEFAULTS:
        raise InputError(
            f"model_type {model_type!r} is not a Llama-family LM; expected one of {sorted(DEFAULTS)}"
        )
    c = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    if hf.get("pad_token_id", 0) is None:
        c["pad_token_id"] = None
    theta, scaling = _rope(c)
    window, sliding_layers = _sliding(c, model_type)
    bias = bool(c.get("attention_bias", False))
    return LMConfig(
        vocab_size=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], mlp_dim=c["intermediate_size"],
        act=c["hidden_act"], norm_eps=c["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
        max_positions=c["max_position_embeddings"], tie_word_embeddings=bool(c["tie_word_embeddings"]),
        qkv_bias=True if model_type == "qwen2" else bias, out_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(c.get("mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=window, sliding_layers=sliding_layers, bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_ids(c.get("eos_token_id")), pad_token_id=c.get("pad_token_id"),
        initializer_range=float(c["initializer_range"]),
    )  # fmt: skip


def lm_config_to_hf(cfg: LMConfig, model_type: str) -> dict[str, Any]:
    """Return a transformers config.json dict of `model_type` (llama, mistral, qwen2) for `cfg`."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    eos = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)
    hf: dict[str, Any] = dict(
        model_type=model_type, architectures=[CLASSES[model_type]], vocab_size=cfg.vocab_size,
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        hidden_act=cfg.act, max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope, bos_token_id=cfg.bos_token_id,
        eos_token_id=eos, pad_token_id=cfg.pad_token_id, initializer_range=cfg.initializer_range,
    )  # fmt: skip
    if model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    else:
        sliding = [cfg.window(i) is not None for i in range(cfg.layers)]
        hf.update(use_sliding_window=any(sliding), sliding_window=cfg.sliding_window if any(sliding) else None,
                  max_window_layers=sliding.index(True) if any(sliding) else cfg.layers,
                  layer_types=["sliding_attention" if s else "full_attention" for s in sliding])  # fmt: skip
    return hf


def hf_model_type(cfg: LMConfig, prefer: str | None = None) -> str | None:
    """Return a transformers model_type whose config represents `cfg` exactly (`prefer` first), or None."""
    for model_type in ([prefer] if prefer in CLASSES else []) + list(CLASSES):
        back = lm_config_from_hf(lm_config_to_hf(cfg, model_type))
        if back == cfg:
            return model_type
    return None


def llama_key_map(cfg: LMConfig) -> list[Rule]:
    """Return every rule between transformers' Llama/Mistral/Qwen2 tensor names and DecoderLM's."""
    q, kv = cfg.heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    rules = [rename("token_embed.weight", "model.embed_tokens.weight")]
    for i in range(cfg.layers):
        o, t = f"blocks.{i}", f"model.layers.{i}"
        rules += fused(f"{o}.attn.qkv", [f"{t}.self_attn.{p}_proj" for p in "qkv"], (q, kv, kv), cfg.qkv_bias)
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.o_proj", cfg.out_bias)
        rules += linear(f"{o}.norm1", f"{t}.input_layernorm", bias=False)
        rules += linear(f"{o}.norm2", f"{t}.post_attention_layernorm", bias=False)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            rules += linear(f"{o}.mlp.{ours}", f"{t}.mlp.{theirs}", cfg.mlp_bias)
    rules += linear("norm", "model.norm", bias=False)
    if not cfg.tie_word_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return rules


def drop_derived(weights: dict[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """Return `weights` without tensors that are copies or functions of others: rotary tables, a tied head."""
    derived = {k for k in weights if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings and "lm_head.weight" in weights:
        derived.add("lm_head.weight")  # some tied checkpoints store the head as well
    return {k: v for k, v in weights.items() if k not in derived}
