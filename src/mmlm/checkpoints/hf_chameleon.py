"""transformers ChameleonForConditionalGeneration folders <-> mmlm's ChameleonModel: config reader, the image
vocabulary (VQ code -> token id) and the key map of the VQ-GAN (ChameleonVQVAE) and the LM.

The VQ-GAN's attention blocks store q, k, v and proj_out as 1×1 convolutions [C, C, 1, 1]; mmlm's Attention
holds them as one fused qkv linear [3C, C] and an output linear [C, C], so those rules carry their shape.
"""

import dataclasses
from typing import Any

from mmlm.checkpoints.hf_llama import LLAMA_DEFAULTS, llama_key_map, lm_config_from_hf, lm_config_to_hf
from mmlm.checkpoints.keymap import Rule, linear, rename
from mmlm.errors import InputError
from mmlm.models.chameleon import ChameleonConfig
from mmlm.models.vq_image_tokenizer import GROUPS, VQTokenizerConfig

IMAGE_TOKEN_PREFIX = (
    "IMGIMG"  # vocabulary entries "IMGIMG" + the code's digits as letters A-J + one end letter
)
# transformers' ChameleonConfig defaults where they differ from Llama's
CHAMELEON_DEFAULTS: dict[str, Any] = dict(
    LLAMA_DEFAULTS, vocab_size=65536, max_position_embeddings=4096, rms_norm_eps=1e-5, swin_norm=False
)

# transformers' ChameleonVQVAEConfig defaults, for keys a config.json may leave out
VQ_DEFAULTS: dict[str, Any] = dict(
    embed_dim=256, num_embeddings=8192, double_latent=False, latent_channels=256, resolution=512, in_channels=3,
    base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=None,
    attn_type="vanilla",
)  # fmt: skip


def vq_config_from_hf(hf: dict[str, Any] | None, source: str = "vq_config") -> VQTokenizerConfig:
    """Return the VQTokenizerConfig of a transformers ChameleonVQVAEConfig dict (config.json's vq_config)."""
    c = {**VQ_DEFAULTS, **{k: v for k, v in (hf or {}).items() if k in VQ_DEFAULTS and v is not None}}
    widths = [c["base_channels"] * m for m in [1, *c["channel_multiplier"]]]
    if any(w % GROUPS for w in widths):
        raise InputError(
            f"{source}: base_channels × channel_multiplier {widths} must all be multiples of {GROUPS} (GroupNorm groups)"
        )
    return VQTokenizerConfig(**{**c, "channel_multiplier": list(c["channel_multiplier"])})


def vq_config_to_hf(cfg: VQTokenizerConfig) -> dict[str, Any]:
    """Return transformers' vq_config dict for `cfg`."""
    return {"model_type": "chameleon_vqgan", **{k: getattr(cfg, k) for k in VQ_DEFAULTS}}


def _conv1x1(ours: str, theirs: str, channels: int) -> list[Rule]:
    return [rename(f"{ours}.weight", f"{theirs}.weight", their_shape=(channels, channels, 1, 1)),
            rename(f"{ours}.bias", f"{theirs}.bias")]  # fmt: skip


def _attention(ours: str, theirs: str, channels: int) -> list[Rule]:
    qkv = [f"{theirs}.{p}" for p in "qkv"]
    return [
        *linear(f"{ours}.norm", f"{theirs}.norm"),
        Rule((f"{ours}.attn.qkv.weight",), tuple(f"{t}.weight" for t in qkv), (channels,) * 3,
             their_shape=(channels, channels, 1, 1)),
        Rule((f"{ours}.attn.qkv.bias",), tuple(f"{t}.bias" for t in qkv), (channels,) * 3),
        *_conv1x1(f"{ours}.attn.out", f"{theirs}.proj_out", channels),
    ]  # fmt: skip


def _resnet(ours: str, theirs: str, in_channels: int, out_channels: int) -> list[Rule]:
    rules = [r for p in ("norm1", "conv1", "norm2", "conv2") for r in linear(f"{ours}.{p}", f"{theirs}.{p}")]
    if in_channels != out_channels:
        rules += linear(f"{ours}.nin_shortcut", f"{theirs}.nin_shortcut")
    return rules


def vq_key_map(cfg: VQTokenizerConfig, prefix: str = "model.vqmodel.") -> list[Rule]:
    """Return every rule between transformers' ChameleonVQVAE tensors (under `prefix`) and VQImageTokenizer's."""
    enc = f"{prefix}encoder"
    rules = linear("conv_in", f"{enc}.conv_in")
    widths = [cfg.base_channels * m for m in [1, *cfg.channel_multiplier]]
    resolution = cfg.resolution
    for i in range(len(cfg.channel_multiplier)):
        o, t = f"down.{i}", f"{enc}.down.{i}"
        attention = (
            cfg.attn_type == "vanilla"
            and cfg.attn_resolutions is not None
            and resolution in cfg.attn_resolutions
        )
        for j in range(cfg.num_res_blocks):
            rules += _resnet(
                f"{o}.block.{j}", f"{t}.block.{j}", widths[i] if j == 0 else widths[i + 1], widths[i + 1]
            )
            if attention:
                rules += _attention(f"{o}.attn.{j}", f"{t}.attn.{j}", widths[i + 1])
        if i < len(cfg.channel_multiplier) - 1:
            rules += linear(f"{o}.downsample.conv", f"{t}.downsample.conv")
            resolution //= 2
    width = widths[-1]
    rules += _resnet("mid_block_1", f"{enc}.mid.block_1", width, width)
    if cfg.attn_type == "vanilla":
        rules += _attention("mid_attn_1", f"{enc}.mid.attn_1", width)
    rules += _resnet("mid_block_2", f"{enc}.mid.block_2", width, width)
    rules += linear("norm_out", f"{enc}.norm_out") + linear("conv_out", f"{enc}.conv_out")
    rules += linear("quant_conv", f"{prefix}quant_conv") + linear(
        "post_quant_conv", f"{prefix}post_quant_conv"
    )
    rules.append(rename("codebook.weight", f"{prefix}quantize.embedding.weight"))
    return rules


def code_token_ids(vocabulary_map: dict[str, int], codes: int) -> tuple[int, ...]:
    """Return the vocabulary id of each VQ code 0..codes-1 from the tokenizer's vocabulary (transformers' img2bpe)."""
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    table: dict[int, int] = {}
    for name, token_id in vocabulary_map.items():
        if name.startswith(IMAGE_TOKEN_PREFIX):
            table[int("".join(digits.get(c, c) for c in name[len(IMAGE_TOKEN_PREFIX) : -1]))] = token_id
    missing = [k for k in range(codes) if k not in table]
    if missing:
        raise InputError(
            f"vocabulary_map: no {IMAGE_TOKEN_PREFIX} token for VQ code {missing[0]} ({len(missing)} of {codes} missing)"
        )
    return tuple(table[k] for k in range(codes))


def chameleon_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ChameleonConfig:
    """Return the ChameleonConfig of a transformers ChameleonForConditionalGeneration config.json."""
    vocabulary = hf.get("vocabulary_map")
    if not isinstance(vocabulary, dict) or "<image>" not in vocabulary:
        raise InputError(
            f"{source}: vocabulary_map must be the tokenizer's vocabulary, with an '<image>' entry"
        )
    c = {**CHAMELEON_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    lm = lm_config_from_hf({**c, "model_type": "llama"})
    lm = dataclasses.replace(lm, qk_norm="layer_per_head", qk_norm_eps=1e-5, swin_norm=bool(c["swin_norm"]))
    vq = vq_config_from_hf(hf.get("vq_config"), f"{source}: vq_config")
    return ChameleonConfig(
        vq=vq, lm=lm, image_token_id=int(vocabulary["<image>"]),
        code_token_ids=code_token_ids(vocabulary, vq.num_embeddings),
    )  # fmt: skip


def chameleon_config_to_hf(cfg: ChameleonConfig, vocabulary: dict[str, int]) -> dict[str, Any]:
    """Return transformers' config.json for `cfg`; `vocabulary` (the tokenizer's) becomes its vocabulary_map."""
    if vocabulary.get("<image>") != cfg.image_token_id or (
        code_token_ids(vocabulary, cfg.vq.num_embeddings) != cfg.code_token_ids
    ):
        raise InputError(
            "vocabulary: its <image> and IMGIMG tokens are not the ids the model's image_token_id and "
            "code_token_ids name"
        )
    hf = lm_config_to_hf(cfg.lm, "llama")
    hf.pop("head_dim")  # ChameleonConfig has none: hidden_size / num_attention_heads
    hf.update(model_type="chameleon", architectures=["ChameleonForConditionalGeneration"],
              swin_norm=cfg.lm.swin_norm, vq_config=vq_config_to_hf(cfg.vq), vocabulary_map=dict(vocabulary))  # fmt: skip
    return hf


def _under(prefix: str, rules: list[Rule]) -> list[Rule]:
    return [dataclasses.replace(r, ours=tuple(prefix + o for o in r.ours)) for r in rules]


def chameleon_key_map(cfg: ChameleonConfig) -> list[Rule]:
    """Return every rule between transformers' ChameleonForConditionalGeneration tensors and ChameleonModel's."""
    rules = _under("lm.", llama_key_map(cfg.lm))
    for i in range(cfg.lm.layers):
        for p in ("q_norm", "k_norm"):
            rules += linear(f"lm.blocks.{i}.attn.{p}", f"model.layers.{i}.self_attn.{p}")
    return rules + _under("vqmodel.", vq_key_map(cfg.vq, "model.vqmodel."))
