"""transformers OPT (OPTForCausalLM, model_type "opt") <-> mmlm's DecoderLM: config and key map.

OPT (Zhang et al. 2022) is DecoderLM with its OPT options: learned positions whose ids start at row 2 of the
table (`position_offset`), LayerNorm (eps 1e-5, nn.LayerNorm's default: OPT's config has no eps), biased q, k, v,
out, fc1, fc2, a ReLU MLP and a head tied to the token embeddings. Read here as BLIP-2's LM; mmlm reads the
pre-norm OPTs (125m, 1.3b, 2.7b, 6.7b, ...) whose word_embed_proj_dim equals hidden_size. opt-350m's post-norm
layers and project_in/project_out are not modelled and are refused.

Their names (under `prefix`, e.g. "model.decoder") -> ours:
    embed_tokens / embed_positions                  -> token_embed / pos_embed
    layers.{i}.self_attn.{q,k,v}_proj              -> blocks.{i}.attn.qkv (fused, [q; k; v])
    layers.{i}.self_attn.out_proj                   -> blocks.{i}.attn.out
    layers.{i}.self_attn_layer_norm / final_layer_norm -> blocks.{i}.norm1 / norm2
    layers.{i}.fc1 / fc2                            -> blocks.{i}.mlp.fc1 / fc2
    final_layer_norm                                -> norm
"""

from typing import Any

from mmlm.checkpoints.keymap import Rule, fused, linear, rename
from mmlm.errors import InputError
from mmlm.layers.mlp import ACTIVATIONS
from mmlm.models.decoder_lm import LMConfig

# transformers' OPTConfig defaults (opt-350m's sizes) for keys a config.json may leave out
OPT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
    activation_function="relu", max_position_embeddings=2048, do_layer_norm_before=True,
    word_embed_proj_dim=None, enable_bias=True, layer_norm_elementwise_affine=True, bos_token_id=2,
    eos_token_id=2, pad_token_id=1, tie_word_embeddings=True, init_std=0.02, _remove_final_layer_norm=False,
)  # fmt: skip
OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
OPT_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which OPT's layers use


def lm_config_from_opt(hf: dict[str, Any]) -> LMConfig:
    """Return the LMConfig of a transformers OPTConfig dict (pre-norm, word_embed_proj_dim = hidden_size)."""
    c = {**OPT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k == "pad_token_id"}}
    width, heads = c["hidden_size"], c["num_attention_heads"]
    if not c["do_layer_norm_before"] or c["_remove_final_layer_norm"]:
        raise InputError(
            "text_config.do_layer_norm_before: mmlm reads pre-norm OPT (not opt-350m's post-norm)"
        )
    if c["word_embed_proj_dim"] not in (None, width):
        raise InputError(
            f"text_config.word_embed_proj_dim: {c['word_embed_proj_dim']} differs from hidden_size {width}; "
            "mmlm does not model OPT's project_in/project_out"
        )
    if not c["layer_norm_elementwise_affine"]:
        raise InputError("text_config.layer_norm_elementwise_affine: mmlm reads OPT with affine LayerNorms")
    if width % heads:
        raise InputError(f"text_config.hidden_size: {width} is not a multiple of num_attention_heads={heads}")
    if c["activation_function"] not in ACTIVATIONS:
        raise InputError(
            f"text_config.activation_function: got {c['activation_function']!r}; "
            f"expected one of {sorted(ACTIVATIONS)}"
        )
    eos = c["eos_token_id"]
    bias = bool(c["enable_bias"])
    return LMConfig(
        vocab_size=c["vocab_size"], width=width, layers=c["num_hidden_layers"], heads=heads, kv_heads=heads,
        head_dim=width // heads, mlp_dim=c["ffn_dim"], act=c["activation_function"], norm_eps=OPT_LAYER_NORM_EPS,
        max_positions=c["max_position_embeddings"], tie_word_embeddings=bool(c["tie_word_embeddings"]),
        qkv_bias=bias, out_bias=bias, mlp_bias=bias, bos_token_id=c["bos_token_id"],
        eos_token_ids=list(eos) if isinstance(eos, list | tuple) else ([] if eos is None else [eos]),
        pad_token_id=c["pad_token_id"], initializer_range=float(c["init_std"]), norm="layer", gated_mlp=False,
        positions="learned", position_offset=OPT_POSITION_OFFSET,
    )  # fmt: skip


def opt_representable(cfg: LMConfig) -> bool:
    """Return True if a transformers OPTConfig holds `cfg` exactly."""
    return lm_config_from_opt(lm_config_to_opt(cfg)) == cfg


def lm_config_to_opt(cfg: LMConfig) -> dict[str, Any]:
    """Return a transformers OPTConfig dict for `cfg` (an OPT-style LMConfig)."""
    eos = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)
    return dict(
        model_type="opt", architectures=["OPTForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, ffn_dim=cfg.mlp_dim, num_attention_heads=cfg.heads,
        activation_function=cfg.act, max_position_embeddings=cfg.max_positions, do_layer_norm_before=True,
        word_embed_proj_dim=cfg.width, enable_bias=cfg.qkv_bias, layer_norm_elementwise_affine=True,
        bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, init_std=cfg.initializer_range,
    )  # fmt: skip


def opt_key_map(cfg: LMConfig, prefix: str = "model.decoder", head: str = "lm_head") -> list[Rule]:
    """Return every rule between an OPT checkpoint's tensors (decoder under `prefix`) and DecoderLM's."""
    d, b = cfg.width, cfg.qkv_bias
    rules = [rename("token_embed.weight", f"{prefix}.embed_tokens.weight"),
             rename("pos_embed.weight", f"{prefix}.embed_positions.weight")]  # fmt: skip
    for i in range(cfg.layers):
        o, t = f"blocks.{i}", f"{prefix}.layers.{i}"
        rules += fused(f"{o}.attn.qkv", [f"{t}.self_attn.{p}_proj" for p in "qkv"], (d, d, d), b)
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.out_proj", b)
        rules += linear(f"{o}.norm1", f"{t}.self_attn_layer_norm")
        rules += linear(f"{o}.norm2", f"{t}.final_layer_norm")
        rules += linear(f"{o}.mlp.fc1", f"{t}.fc1", b)
        rules += linear(f"{o}.mlp.fc2", f"{t}.fc2", b)
    rules += linear("norm", f"{prefix}.final_layer_norm")
    if not cfg.tie_word_embeddings:
        rules.append(rename("lm_head.weight", f"{head}.weight"))
    return rules
