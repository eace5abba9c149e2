"""transformers Whisper folders (WhisperModel, WhisperForConditionalGeneration, WhisperEncoder) -> mmlm's
AudioEncoder: config translation and the encoder's key map. The text decoder is not read."""

from typing import Any

import torch

from mmlm.checkpoints.keymap import Rule, fused, linear, rename
from mmlm.errors import InputError
from mmlm.models.audio_encoder import AudioConfig

# transformers' WhisperConfig defaults: config.json written by save_pretrained leaves out keys equal to them
WHISPER_DEFAULTS = dict(
    num_mel_bins=80,
    d_model=384,
    encoder_layers=4,
    encoder_attention_heads=6,
    encoder_ffn_dim=1536,
    max_source_positions=1500,
    activation_function="gelu",
    init_std=0.02,
)
# where the encoder's tensors live, per model class; the first prefix a checkpoint holds conv1 under wins
ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")


def audio_config_from_whisper(hf: dict[str, Any]) -> AudioConfig:
    """Return the AudioConfig of a transformers WhisperConfig dict (its encoder half)."""
    w = {**WHISPER_DEFAULTS, **hf}
    return AudioConfig(
        n_mels=w["num_mel_bins"], width=w["d_model"], layers=w["encoder_layers"],
        heads=w["encoder_attention_heads"], mlp_dim=w["encoder_ffn_dim"], max_frames=w["max_source_positions"],
        act=w["activation_function"], init_std=float(w["init_std"]),
    )  # fmt: skip


def audio_config_to_whisper(cfg: AudioConfig) -> dict[str, Any]:
    """Return the encoder keys of a transformers WhisperConfig dict for `cfg`."""
    return dict(num_mel_bins=cfg.n_mels, d_model=cfg.width, encoder_layers=cfg.layers,
                encoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.mlp_dim,
                max_source_positions=cfg.max_frames, activation_function=cfg.act,
                init_std=cfg.init_std)  # fmt: skip


def whisper_encoder_key_map(cfg: AudioConfig, theirs: str = "encoder.") -> list[Rule]:
    """Return the rules between a transformers WhisperEncoder's tensors (under prefix `theirs`) and AudioEncoder's.

    Their k_proj has no bias; the rule reads `…k_proj.bias`, which `encoder_tensors` adds as zeros.
    """
    rules = [
        *linear("conv1", f"{theirs}conv1"),
        *linear("conv2", f"{theirs}conv2"),
        rename("pos_embed", f"{theirs}embed_positions.weight"),
    ]
    for i in range(cfg.layers):
        o, t = f"transformer.blocks.{i}", f"{theirs}layers.{i}"
        rules += fused(f"{o}.attn.qkv", [f"{t}.self_attn.{p}_proj" for p in "qkv"], (cfg.width,) * 3)
        rules += linear(f"{o}.attn.out", f"{t}.self_attn.out_proj")
        rules += linear(f"{o}.norm1", f"{t}.self_attn_layer_norm")
        rules += linear(f"{o}.norm2", f"{t}.final_layer_norm")
        rules += linear(f"{o}.mlp.fc1", f"{t}.fc1") + linear(f"{o}.mlp.fc2", f"{t}.fc2")
    return rules + linear("norm_post", f"{theirs}layer_norm")


def encoder_prefix(weights: dict[str, torch.Tensor], source: str) -> str:
    """Return the prefix the checkpoint stores the encoder under: model.encoder., encoder. or none."""
    for prefix in ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in weights:
            return prefix
    raise InputError(
        f"{source}: no Whisper encoder tensors (expected model.encoder.conv1.weight or encoder.conv1.weight)"
    )


def encoder_tensors(
    weights: dict[str, torch.Tensor], cfg: AudioConfig, source: str
) -> dict[str, torch.Tensor]:
    """Return the checkpoint's encoder tensors under the prefix "encoder.", with zero k_proj biases added.

    Decoder tensors (decoder.*, proj_out.*) are dropped: the audio encoder does not use them.
    """
    prefix = encoder_prefix(weights, source)
    if prefix:
        encoder = {"encoder." + k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    else:  # a bare WhisperEncoder: every tensor is the encoder's
        encoder = {"encoder." + k: v for k, v in weights.items()}
    for i in range(cfg.layers):
        k_weight = encoder.get(f"encoder.layers.{i}.self_attn.k_proj.weight")
        if k_weight is not None:
            encoder.setdefault(
                f"encoder.layers.{i}.self_attn.k_proj.bias", k_weight.new_zeros(k_weight.shape[0])
            )
    return encoder
