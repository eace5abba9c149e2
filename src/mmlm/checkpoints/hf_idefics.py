"""transformers Idefics (v1) Perceiver resampler and gated cross-attention layers <-> mmlm's Flamingo modules.

Idefics stores the resampler under `model.perceiver_resampler` and the gated blocks under
`model.gated_cross_attn_layers.{i}`; pass those as `theirs`. Their separate k/v projections become our fused `kv`
(k rows first); a vector α is [1, 1, D] in Idefics and [D] here.
"""

from mmlm.checkpoints.keymap import Rule, fused, linear, rename


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
