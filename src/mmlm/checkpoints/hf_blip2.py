"""transformers Blip2ForConditionalGeneration / Blip2Model folders -> mmlm: config and key maps.

`load_blip2_qformer` reads the connector alone; `vlm_config_from_blip2` and `blip2_vlm_key_map` (end of the
file) read the whole Blip2ForConditionalGeneration with OPT as a VisionLanguageModel. For the connector, only
what it holds is read: `query_tokens`, `qformer.*` and `language_projection.*`. The vision tower
(`vision_model.*`) and the LM (`language_model.*`) are other models' business. What the Q-Former must be fed
is transformers' `vision_model(...).last_hidden_state`: every token, the class token included, after the
tower's final LayerNorm (`vision_model.post_layernorm`). That norm belongs to the vision tower
(mmlm's `VisionTransformer.norm_post`), not to this connector.

Their names -> ours, per Q-Former layer i (`qformer.encoder.layer.{i}` -> `qformer.blocks.{i}`):
    attention.attention.{query,key,value}       -> attn.qkv (fused, [q; k; v])
    attention.output.dense / .LayerNorm         -> attn.out / norm1
    crossattention.attention.query              -> cross_attn.q          (layers with i % frequency == 0)
    crossattention.attention.{key,value}        -> cross_attn.kv (fused, [k; v]; in width encoder_hidden_size)
    crossattention.output.dense / .LayerNorm    -> cross_attn.out / norm_cross
    intermediate_query.dense                    -> mlp.fc1
    output_query.dense / .LayerNorm             -> mlp.fc2 / norm2
and `query_tokens` -> `qformer.query_tokens`, `qformer.layernorm` -> `qformer.query_norm`,
`language_projection` -> `language_projection`.
"""

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mmlm.checkpoints.hf_opt import lm_config_from_opt, lm_config_to_opt, opt_key_map
from mmlm.checkpoints.keymap import Rule, fused, linear, rename, to_ours
from mmlm.checkpoints.safetensors_io import weight_files
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.fusion.qformer import QFormerConnector, build_qformer_connector
from mmlm.layers.mlp import ACTIVATIONS
from mmlm.models.vision import VisionConfig
from mmlm.models.vlm import VLMConfig

# transformers' Blip2QFormerConfig / Blip2Config defaults for keys a config.json may leave out
QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12,
                        hidden_act="gelu")  # fmt: skip
NUM_QUERY_TOKENS = 32  # Blip2Config.num_query_tokens (top level, not in qformer_config)
# transformers' Blip2VisionConfig defaults (the EVA ViT-g tower of the released checkpoints)
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                       num_channels=3)  # fmt: skip

CONNECTOR_PREFIXES = ("query_tokens", "qformer.", "language_projection.")
# BLIP-2's layers hold a second FFN, `intermediate`/`output`, for text tokens, used only by the stage-1
# objectives (ITC/ITG/ITM; transformers builds it when use_qformer_text_input), as are the text embeddings.
# Generation feeds the K queries alone, which take `intermediate_query`/`output_query`; the text path is skipped.
TEXT_ONLY = re.compile(r"qformer\.embeddings\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def connector_config_from_blip2(hf: dict[str, Any]) -> ConnectorConfig:
    """Return the ConnectorConfig of a transformers Blip2Config dict (its `qformer_config` and `num_query_tokens`).

    The vision width is `blip2_vision_width(hf)`.
    """
    q = {**QFORMER_DEFAULTS, **(hf.get("qformer_config") or {})}
    width, heads, every = q["hidden_size"], q["num_attention_heads"], q["cross_attention_frequency"]
    if width % heads:
        raise InputError(
            f"qformer_config.hidden_size: {width} is not a multiple of num_attention_heads={heads}"
        )
    if every < 1:
        raise InputError(
            f"qformer_config.cross_attention_frequency: got {every}; expected a positive integer"
        )
    if q["hidden_act"] not in ACTIVATIONS:
        raise InputError(
            f"qformer_config.hidden_act: got {q['hidden_act']!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ConnectorConfig(
        kind="qformer", act=q["hidden_act"], bias=True, num_queries=hf.get("num_query_tokens", NUM_QUERY_TOKENS),
        depth=q["num_hidden_layers"], heads=heads, head_dim=width // heads, width=width,
        mlp_dim=q["intermediate_size"], cross_attention_frequency=every, norm_eps=q["layer_norm_eps"],
    )  # fmt: skip


def blip2_vision_width(hf: dict[str, Any]) -> int:
    """Return the width of the image features the Q-Former cross-attends to (its key/value input width)."""
    # Blip2Config sets qformer_config.encoder_hidden_size to vision_config.hidden_size, so the tower decides
    vision = hf.get("vision_config") or {}
    q = {**QFORMER_DEFAULTS, **(hf.get("qformer_config") or {})}
    return vision.get("hidden_size", q["encoder_hidden_size"])


def blip2_key_map(cfg: ConnectorConfig) -> list[Rule]:
    """Return every rule between a BLIP-2 checkpoint's connector tensors and QFormerConnector's (cfg.width set)."""
    inner = cfg.heads * (cfg.head_dim or cfg.width // cfg.heads)  # transformers' all_head_size
    rules = [
        rename("qformer.query_tokens", "query_tokens"),
        *linear("qformer.query_norm", "qformer.layernorm"),
    ]
    for i in range(cfg.depth):
        ours, theirs = f"qformer.blocks.{i}", f"qformer.encoder.layer.{i}"
        qkv = [f"{theirs}.attention.attention.{p}" for p in ("query", "key", "value")]
        rules += fused(f"{ours}.attn.qkv", qkv, (inner, inner, inner))
        rules += linear(f"{ours}.attn.out", f"{theirs}.attention.output.dense")
        rules += linear(f"{ours}.norm1", f"{theirs}.attention.output.LayerNorm")
        if i % cfg.cross_attention_frequency == 0:
            cross = f"{theirs}.crossattention"
            rules += linear(f"{ours}.cross_attn.q", f"{cross}.attention.query")
            rules += fused(f"{ours}.cross_attn.kv", [f"{cross}.attention.key", f"{cross}.attention.value"],
                           (inner, inner))  # fmt: skip
            rules += linear(f"{ours}.cross_attn.out", f"{cross}.output.dense")
            rules += linear(f"{ours}.norm_cross", f"{cross}.output.LayerNorm")
        # the query tokens' FFN; the text tokens' `intermediate`/`output` is not mapped (see TEXT_ONLY)
        rules += linear(f"{ours}.mlp.fc1", f"{theirs}.intermediate_query.dense")
        rules += linear(f"{ours}.mlp.fc2", f"{theirs}.output_query.dense")
        rules += linear(f"{ours}.norm2", f"{theirs}.output_query.LayerNorm")
    return rules + linear("language_projection", "language_projection")


def blip2_connector_from_state_dict(
    hf: dict[str, Any], tensors: dict[str, torch.Tensor], source: str = "state dict"
) -> tuple[QFormerConnector, ConnectorConfig]:
    """Return (connector, config) from a Blip2Config dict and the checkpoint's connector tensors.

    `tensors` may hold the whole checkpoint; tensors outside the connector and the text-only FFN are ignored.
    """
    if "query_tokens" not in tensors:
        raise InputError(f"{source}: no 'query_tokens' tensor; expected a BLIP-2 checkpoint")
    cfg = connector_config_from_blip2(hf)
    text = hf.get("text_config") or {}
    # an LM config names its width hidden_size (OPT) or d_model (T5); failing both, the projection's rows say it
    lm_dim = text.get("hidden_size", text.get("d_model"))
    if lm_dim is None and "language_projection.weight" in tensors:
        lm_dim = tensors["language_projection.weight"].shape[0]
    if lm_dim is None:
        raise InputError(f"{source}: text_config.hidden_size is missing and there is no language_projection")
    with torch.device("meta"):  # no random init for weights about to be replaced
        model = build_qformer_connector(cfg, blip2_vision_width(hf), lm_dim)
    model = model.to_empty(device="cpu")  # the checkpoint's tensors are copied in, cast to fp32
    theirs = {k: v for k, v in tensors.items() if k.startswith(CONNECTOR_PREFIXES) and not TEXT_ONLY.match(k)}
    our_shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(to_ours(theirs, blip2_key_map(cfg), our_shapes, source))
    return model, cfg


def read_connector_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Return the connector tensors of a BLIP-2 folder's safetensors, leaving the vision tower and LM unread."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.startswith(CONNECTOR_PREFIXES):
                        tensors[key] = f.get_tensor(key)
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def load_blip2_qformer(folder: str | Path) -> tuple[QFormerConnector, ConnectorConfig]:
    """Return (connector, config) read from a transformers BLIP-2 folder (config.json + safetensors)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{config_path}: not found; expected a transformers BLIP-2 folder") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{config_path}: not readable JSON ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "blip-2":
        got = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise InputError(f"{config_path}: model_type is {got!r}; expected 'blip-2'")
    return blip2_connector_from_state_dict(hf, read_connector_tensors(folder), str(folder))


# ---- the whole model: EVA-style ViT + Q-Former connector + OPT, as mmlm's VisionLanguageModel ----------------
# BLIP-2's ViT (Blip2VisionModel) is CLIP's without the pre-LayerNorm: a biased patch convolution, a class token,
# learned positions, pre-norm blocks whose fused qkv has biases for q and v only (k's third is zero: transformers
# stores the cat [q_bias; 0; v_bias] as `qkv.bias`, older files store `q_bias` and `v_bias`), and
# `post_layernorm`, whose output over every token, class token included, feeds the Q-Former.


def blip2_vision_config(hf: dict[str, Any]) -> VisionConfig:
    """Return the VisionConfig of a Blip2Config dict's `vision_config`."""
    v = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["hidden_size"] % v["num_attention_heads"]:
        raise InputError(
            f"vision_config.hidden_size: {v['hidden_size']} is not a multiple of "
            f"num_attention_heads={v['num_attention_heads']}"
        )
    if v["hidden_act"] not in ACTIVATIONS:
        raise InputError(
            f"vision_config.hidden_act: got {v['hidden_act']!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        act=v["hidden_act"], norm_eps=v["layer_norm_eps"], channels=v.get("num_channels", 3), class_token=True,
        patch_bias=True, pre_norm=False, pool="cls", embed_dim=None,
    )  # fmt: skip


def vlm_config_from_blip2(hf: dict[str, Any]) -> VLMConfig:
    """Return the VLMConfig of a transformers Blip2Config dict with an OPT language model."""
    text = {"model_type": "opt", **(hf.get("text_config") or {})}
    if text["model_type"] != "opt" or not hf.get("use_decoder_only_language_model", True):
        raise InputError(
            f"text_config.model_type: got {text['model_type']!r}; mmlm reads BLIP-2 with OPT, "
            "not encoder-decoder LMs such as Flan-T5"
        )
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if not isinstance(image_token, int):
        raise InputError(
            "image_token_index: missing; a transformers 5 BLIP-2 config names the `<image>` token's id"
        )
    lm = lm_config_from_opt(text)
    connector = connector_config_from_blip2(hf)
    vision = blip2_vision_config(hf)
    if (hf.get("qformer_config") or {}).get("encoder_hidden_size", vision.width) != vision.width:
        raise InputError(
            f"qformer_config.encoder_hidden_size: differs from vision_config.hidden_size {vision.width}"
        )
    return VLMConfig(vision=vision, lm=lm, connector=connector, image_token_id=image_token,
                     feature_layers=[-1], feature_select="full", feature_norm=True)  # fmt: skip


def blip2_vision_key_map(v: VisionConfig, ours: str = "vision", theirs: str = "vision_model") -> list[Rule]:
    """Return the rules between transformers' Blip2VisionModel (`theirs`) and a VisionTransformer (`ours`)."""
    d, n = v.width, v.grid**2 + 1
    rules = [
        rename(f"{ours}.class_token", f"{theirs}.embeddings.class_embedding", their_shape=(1, 1, d)),
        *linear(f"{ours}.patch_embed", f"{theirs}.embeddings.patch_embedding"),
        rename(f"{ours}.pos_embed", f"{theirs}.embeddings.position_embedding", their_shape=(1, n, d)),
    ]
    for i in range(v.layers):
        o, t = f"{ours}.transformer.blocks.{i}", f"{theirs}.encoder.layers.{i}"
        rules += linear(f"{o}.attn.qkv", f"{t}.self_attn.qkv")
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.projection")
        rules += linear(f"{o}.norm1", f"{t}.layer_norm1")
        rules += linear(f"{o}.norm2", f"{t}.layer_norm2")
        rules += linear(f"{o}.mlp.fc1", f"{t}.mlp.fc1")
        rules += linear(f"{o}.mlp.fc2", f"{t}.mlp.fc2")
    return rules + linear(f"{ours}.norm_post", f"{theirs}.post_layernorm")


def blip2_vlm_key_map(cfg: VLMConfig) -> list[Rule]:
    """Return every rule between a Blip2ForConditionalGeneration checkpoint (OPT) and VisionLanguageModel's."""
    rules = blip2_vision_key_map(cfg.vision)
    for rule in blip2_key_map(cfg.connector):
        rules.append(
            Rule(tuple(f"connector.{n}" for n in rule.ours), rule.theirs, rule.sizes, rule.their_shape)
        )
    for rule in opt_key_map(cfg.lm, "language_model.model.decoder", "language_model.lm_head"):
        rules.append(Rule(tuple(f"lm.{n}" for n in rule.ours), rule.theirs, rule.sizes, rule.their_shape))
    return rules


def fuse_vision_qkv_bias(weights: dict[str, torch.Tensor]) -> None:
    """Replace older files' `self_attn.q_bias` and `v_bias` by the fused `qkv.bias` [q; 0; v] (in place)."""
    for name in [k for k in weights if k.endswith(".self_attn.q_bias")]:
        layer = name.removesuffix("q_bias")
        q, v = weights.pop(name), weights.pop(f"{layer}v_bias")
        weights[f"{layer}qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def blip2_config_to_hf(cfg: VLMConfig, num_query_tokens: int) -> dict[str, Any]:
    """Return a transformers Blip2Config dict (OPT LM) for a VLMConfig read by `vlm_config_from_blip2`."""
    v, c = cfg.vision, cfg.connector
    vision = dict(model_type="blip_2_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                  num_hidden_layers=v.layers, num_attention_heads=v.heads, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.norm_eps, qkv_bias=True)  # fmt: skip
    width = c.width or v.width
    qformer = dict(model_type="blip_2_qformer", hidden_size=width, num_hidden_layers=c.depth,
                   num_attention_heads=c.heads, intermediate_size=c.mlp_dim or 4 * width,
                   cross_attention_frequency=c.cross_attention_frequency, encoder_hidden_size=v.width,
                   hidden_act=c.act, layer_norm_eps=c.norm_eps if c.norm_eps is not None else 1e-12)  # fmt: skip
    text = lm_config_to_opt(cfg.lm)
    text.pop("architectures")
    return dict(model_type="blip-2", architectures=["Blip2ForConditionalGeneration"], vision_config=vision,
                qformer_config=qformer, text_config=text, num_query_tokens=num_query_tokens,
                image_token_index=cfg.image_token_id, use_decoder_only_language_model=True,
                tie_word_embeddings=cfg.lm.tie_word_embeddings)  # fmt: skip


def blip2_representable(cfg: VLMConfig) -> bool:
    """Return True if transformers' Blip2ForConditionalGeneration (OPT) holds `cfg` exactly."""
    if cfg.connector.kind != "qformer" or cfg.audio is not None or cfg.feature_layers != [-1]:
        return False
    if cfg.feature_select != "full" or not cfg.feature_norm or cfg.lm.positions != "learned":
        return False
    try:
        back = vlm_config_from_blip2(blip2_config_to_hf(cfg, cfg.connector.num_queries))
    except InputError:
        return False
    return back == cfg
