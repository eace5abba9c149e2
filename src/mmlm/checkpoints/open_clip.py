"""open_clip checkpoints (hub folders with open_clip_config.json) <-> mmlm's DualEncoder.

Covers open_clip's own ViT towers (`CLIP`, and `CustomTextCLIP` whose text tower sits under `text.`): the OpenAI,
LAION, DataComp, MetaCLIP and worldwide ViT models. Names and layouts follow open_clip 3.3's model.py and
transformer.py: nn.MultiheadAttention's `in_proj_weight` is q, k, v stacked along dim 0, as in our fused `qkv`;
`visual.proj` and `text_projection` are [in, out] matrices applied as `x @ proj`, the transpose of our Linear.
"""

import gzip
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.keymap import Rule, linear, rename
from mmlm.errors import InputError
from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
PICKLE_NAME = "open_clip_pytorch_model.bin"

# Options whose only values mmlm's towers can represent; anything else is refused by name.
_BLOCK_OPTIONS = {
    "ls_init_value": (None,),  # LayerScale
    "act_kwargs": (None, {}),
    "block_type": (None, "default"),  # "custom": CustomResidualAttentionBlock
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_VISION_OPTIONS = {
    "timm_model_name": (None, ""),
    "attentional_pool": (False,),
    "input_patchnorm": (False,),  # open_clip < 2.24
    "pool_type": ("tok", "avg"),
    "pos_embed_type": ("learnable", "sin_cos_2d"),  # both are stored as a tensor
    **_BLOCK_OPTIONS,
}
_TEXT_OPTIONS = {
    "hf_model_name": (None, ""),
    "embed_cls": (False,),
    "pool_type": ("argmax", "eos", "last"),
    "proj_type": ("linear", "none"),
    **_BLOCK_OPTIONS,
}
_MODEL_OPTIONS = {"multimodal_cfg": (None,)}  # CoCa's decoder
_TEXT_POOL = {"argmax": "eos_argmax", "eos": "eos", "last": "last"}


def _check(section: str, cfg: dict[str, Any], options: dict[str, tuple]) -> None:
    for key, allowed in options.items():
        if key in cfg and cfg[key] not in allowed:
            raise InputError(
                f"{CONFIG_NAME}: {section}.{key}={cfg[key]!r} is not supported by mmlm's DualEncoder "
                f"(supported: {list(allowed)})"
            )


def _square(value: Any, field: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise InputError(f"{CONFIG_NAME}: {field}={value!r}; mmlm's ViT needs a square size")
        value = value[0]
    return int(value)


def _norm_eps(cfg: dict[str, Any], section: str) -> float:
    kwargs = dict(cfg.get("norm_kwargs") or {})
    eps = kwargs.pop("eps", 1e-5)  # nn.LayerNorm's default
    if kwargs:
        raise InputError(f"{CONFIG_NAME}: {section}.norm_kwargs {sorted(kwargs)} is not supported (only eps)")
    return float(eps)


def open_clip_config(model_cfg: dict[str, Any], has_logit_bias: bool = False) -> DualEncoderConfig:
    """Return the DualEncoderConfig of an open_clip model config (`model_cfg` of open_clip_config.json).

    `has_logit_bias` adds SigLIP's logit bias when the weights hold one that the config does not name
    (open_clip's `--siglip` training passes `init_logit_bias` as a keyword, not in the config).
    Raises InputError naming the first option mmlm cannot represent (timm or HF towers, CoCa, layer scale, ...).
    """
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    _check("model_cfg", model_cfg, _MODEL_OPTIONS)
    _check("vision_cfg", vision, _VISION_OPTIONS)
    _check("text_cfg", text, _TEXT_OPTIONS)
    if isinstance(vision.get("layers", 12), list | tuple):
        raise InputError(
            f"{CONFIG_NAME}: vision_cfg.layers={vision['layers']!r} is a ModifiedResNet, not a ViT"
        )
    if vision.get("pool_type") == "avg" and vision.get("final_ln_after_pool"):
        # CLIPA norms the mean of the patch tokens; our mean pool norms each token first
        raise InputError(
            f"{CONFIG_NAME}: vision_cfg.final_ln_after_pool with pool_type 'avg' is not supported"
        )
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # nn.GELU: the exact erf form
    embed_dim = model_cfg.get("embed_dim", 512)

    width = vision.get("width", 768)
    v = VisionConfig(
        image_size=_square(vision.get("image_size", 224), "vision_cfg.image_size"),
        patch_size=_square(vision.get("patch_size", 16), "vision_cfg.patch_size"),
        width=width, layers=vision.get("layers", 12), heads=width // vision.get("head_width", 64),
        mlp_dim=int(width * vision.get("mlp_ratio", 4.0)), act=act, norm_eps=_norm_eps(vision, "vision_cfg"),
        class_token=True, patch_bias=False, pre_norm=not vision.get("no_ln_pre", False),
        pool="mean" if vision.get("pool_type") == "avg" else "cls", embed_dim=embed_dim, proj_bias=False,
        patch_dropout=float(vision.get("patch_dropout") or 0.0),  # training only, as open_clip applies it
    )  # fmt: skip

    width, vocab = text.get("width", 512), text.get("vocab_size", 49408)
    pool = _TEXT_POOL[text.get("pool_type", "argmax")]
    causal = not text.get("no_causal_mask", False)
    t = TextConfig(
        vocab_size=vocab, context_length=text.get("context_length", 77), width=width,
        layers=text.get("layers", 12), heads=text.get("heads", 8), mlp_dim=int(width * text.get("mlp_ratio", 4.0)),
        act=act, norm_eps=_norm_eps(text, "text_cfg"), causal=causal, pool=pool,
        # argmax pooling assumes the end token has the highest id (49407 in CLIP's BPE)
        eos_token_id=text.get("eos_id", 2) if pool == "eos" else vocab - 1,
        pad_token_id=text.get("pad_id", 0),
        # open_clip always pads to context_length; with a causal mask and end-token pooling, padding
        # after the end token cannot change the pooled vector, so padding to the longest text is exact.
        padding="longest" if causal and pool != "last" else "max_length",
        embed_dim=embed_dim if text.get("proj_type", "linear") != "none" else None,
        proj_bias=bool(text.get("proj_bias", False)),
    )  # fmt: skip

    logit_scale = float(model_cfg.get("init_logit_scale", 2.6592))  # ln(1/0.07)
    bias = model_cfg.get("init_logit_bias")
    if bias is None and has_logit_bias:
        bias = -10.0
    if bias is None:
        return DualEncoderConfig(v, t, "clip", logit_scale_init=logit_scale)
    return DualEncoderConfig(
        v, t, "siglip", logit_scale_init=logit_scale, logit_bias_init=float(bias), logit_scale_max=None
    )


def _resblocks(ours: str, theirs: str, layers: int) -> list[Rule]:
    rules = []
    for i in range(layers):
        o, t = f"{ours}.blocks.{i}", f"{theirs}.resblocks.{i}"
        rules += [
            *linear(f"{o}.norm1", f"{t}.ln_1"),
            rename(f"{o}.attn.qkv.weight", f"{t}.attn.in_proj_weight"),  # [3·D, D]: q, k, v rows
            rename(f"{o}.attn.qkv.bias", f"{t}.attn.in_proj_bias"),
            *linear(f"{o}.attn.out", f"{t}.attn.out_proj"),
            *linear(f"{o}.norm2", f"{t}.ln_2"),
            *linear(f"{o}.mlp.fc1", f"{t}.mlp.c_fc"),
            *linear(f"{o}.mlp.fc2", f"{t}.mlp.c_proj"),
        ]
    return rules


def open_clip_key_map(cfg: DualEncoderConfig, custom_text: bool = False) -> list[Rule]:
    """Return every rule between an open_clip CLIP state dict's tensor names and DualEncoder's.

    `custom_text` is open_clip's CustomTextCLIP layout, whose text tower tensors are prefixed `text.`.
    """
    v, t = cfg.vision, cfg.text
    rules = [
        rename("visual.patch_embed.weight", "visual.conv1.weight"),
        rename("visual.class_token", "visual.class_embedding"),
        rename("visual.pos_embed", "visual.positional_embedding"),
        *(linear("visual.norm_pre", "visual.ln_pre") if v.pre_norm else []),
        *_resblocks("visual.transformer", "visual.transformer", v.layers),
        *linear("visual.norm_post", "visual.ln_post"),
        rename("visual.proj.weight", "visual.proj", transpose=True),  # [width, embed_dim]
    ]
    p = "text." if custom_text else ""
    rules += [
        rename("text.token_embed.weight", f"{p}token_embedding.weight"),
        rename("text.pos_embed", f"{p}positional_embedding"),
        *_resblocks("text.transformer", f"{p}transformer", t.layers),
        *linear("text.norm_final", f"{p}ln_final"),
    ]
    if t.embed_dim and t.proj_bias:  # an nn.Linear
        rules += linear("text.proj", f"{p}text_projection")
    elif t.embed_dim:  # a bare [width, embed_dim] matrix
        rules.append(rename("text.proj.weight", f"{p}text_projection", transpose=True))
    rules.append(rename("logit_scale", "logit_scale"))
    if cfg.logit_bias_init is not None:
        rules.append(rename("logit_bias", "logit_bias"))
    return rules


def _read_open_clip_folder(folder: Path) -> tuple[dict[str, Any], Path]:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(f"{folder}: no {CONFIG_NAME}; not an open_clip hub folder")
    try:
        model_cfg = json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{config_path}: expected JSON with a 'model_cfg' object ({e!r})") from None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise InputError(
                f"{folder}: only {PICKLE_NAME} found; mmlm reads safetensors only, since unpickling can run "
                f"arbitrary code. Convert it to {WEIGHTS_NAME} with safetensors.torch.save_file."
            )
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    return model_cfg, weights


def load_open_clip_weights(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DualEncoder:
    """Return a DualEncoder holding an open_clip hub folder's weights (open_clip_model.safetensors), in eval mode."""
    model_cfg, path = _read_open_clip_folder(Path(folder))
    try:
        weights = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if all(k.startswith("module.") for k in weights):  # saved from DistributedDataParallel
        weights = {k.removeprefix("module."): w for k, w in weights.items()}
    cfg = open_clip_config(model_cfg, has_logit_bias="logit_bias" in weights)
    custom_text = bool(model_cfg.get("custom_text")) or "text.token_embedding.weight" in weights
    rules = open_clip_key_map(cfg, custom_text=custom_text)
    return build_from_weights(lambda: DualEncoder(cfg), weights, rules, str(path), device, dtype)


# --- tokenizer -----------------------------------------------------------------------------------------------

SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's spelling (transformers' CLIP: <|startoftext|>)
# open_clip's SimpleTokenizer splits words with this pattern, after ftfy, html.unescape, whitespace and lower
WORD_PATTERN = rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte-value order as CLIP's vocabulary lists it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    return [table[b] for b in printable + shifted]


def open_clip_tokenizer(bpe_path: str | Path) -> Tokenizer:
    """Return open_clip's SimpleTokenizer (clean='lower') as a `tokenizers` Tokenizer built from its merges file.

    `bpe_path` is CLIP's `bpe_simple_vocab_16e6.txt.gz` (shipped inside the open_clip and OpenAI CLIP packages).
    Ids match SimpleTokenizer's, with these known differences, all in its text cleaning:
    - ftfy.fix_text is not run. Its quote uncurling (‘ ’ “ ” -> ' ") and NFC are redone here; mojibake repair,
      Latin ligatures (ﬁ), full-width forms (ＡＢ) and control-character removal are not.
    - html.unescape is not run: "&amp;" stays four tokens instead of "&".
    - Lower-casing is Rust's `to_lowercase`, Python's `str.lower` elsewhere; they agree outside rare scripts.
    Pad with id 0, as open_clip does, or with the end token: the causal mask and end-token pooling make both equal.
    """
    try:
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{bpe_path}: expected CLIP's gzipped BPE merges file ({e})") from None
    merges = [
        tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line
    ]  # SimpleTokenizer's slice
    alphabet = _byte_alphabet()
    vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), SOT, EOT]
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.BPE(ids, merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex("[\u02bc\u2018-\u201b]"), "'"),  # ftfy's uncurl_quotes
        normalizers.Replace(Regex("[\u201c-\u201f]"), '"'),
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase(),
    ])  # fmt: skip
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    # SimpleTokenizer matches the special tokens after lower-casing, hence normalized=True
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in (SOT, EOT)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, ids[SOT]), (EOT, ids[EOT])]
    )
    # SimpleTokenizer.decode: bytes back to text, each end-of-word mark to a space
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    return tokenizer


def write_open_clip_tokenizer(bpe_path: str | Path, folder: str | Path, context_length: int = 77) -> Path:
    """Return `folder` after writing tokenizer.json and tokenizer_config.json for mmlm's HFTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    open_clip_tokenizer(bpe_path).save(str(folder / "tokenizer.json"))
    config = dict(
        model_max_length=context_length, bos_token=SOT, eos_token=EOT, pad_token="!", padding_side="right"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")  # "!" is id 0
    return folder
