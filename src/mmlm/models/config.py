"""Versioned dataclass configs for mmlm models. Loading tolerates unknown keys (with a warning)."""

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeVar

CONFIG_VERSION = 1
T = TypeVar("T")


@dataclass
class VisionConfig:
    """A ViT: patch embedding, optional class token, learned positions, pre-norm blocks, pooling, projection."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    channels: int = 3
    class_token: bool = True  # CLIP has one; SigLIP does not
    patch_bias: bool = False  # CLIP's patch conv has no bias; SigLIP's has one
    stem: str = "patch"  # patch (one linear map per patch) | conv (early 3×3 convolutions, for small data)
    pre_norm: bool = True  # CLIP's LayerNorm before the blocks ("ln_pre")
    pool: str = "cls"  # cls | mean | map (SigLIP's multihead attention-pooling head)
    embed_dim: int | None = 512  # output projection size; None means no projection (SigLIP)
    proj_bias: bool = False
    merge_tokens: int = 0  # ToMe: tokens merged per block (r); 0 = off (encoders/token_merging.py)

    @property
    def grid(self) -> int:
        """Return the number of patches per side at the configured resolution."""
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """A text transformer: token + learned position embeddings, blocks, final norm, pooling, projection."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP's text tower is causal; SigLIP's is bidirectional
    pool: str = "eos"  # eos (first end token) | eos_argmax (highest id; old CLIP configs) | last (SigLIP)
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    padding: str = "longest"  # how the tokenizer pads: longest (CLIP) | max_length (SigLIP)
    embed_dim: int | None = 512
    proj_bias: bool = False


@dataclass
class AudioConfig:
    """A Whisper-style encoder; the defaults are whisper-tiny's (transformers' WhisperConfig defaults)."""

    n_mels: int = 80  # mel bins per frame (80; 128 from large-v3 on)
    width: int = 384
    layers: int = 4
    heads: int = 6
    mlp_dim: int = 1536
    max_frames: int = 1500  # positions after the stride-2 conv: 30 s of audio at 100 mel frames/s -> 1500
    act: str = "gelu"
    eps: float = 1e-5  # Whisper's LayerNorms use PyTorch's default eps
    version: int = CONFIG_VERSION

    @property
    def input_frames(self) -> int:
        """Return the mel frames one input holds (2 · max_frames: the second conv has stride 2)."""
        return 2 * self.max_frames


@dataclass
class DualEncoderConfig:
    """A CLIP- or SigLIP-style dual encoder: two towers, a learned logit scale and, for SigLIP, a logit bias.

    With `audio` set the non-text tower is an audio tower (CLAP-style): a Whisper-style encoder whose frames are
    pooled (`audio_pool`) and projected to `audio_embed_dim`; `vision` is then unused.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    family: str = "clip"  # clip (softmax over the batch) | siglip (pairwise sigmoid)
    logit_scale_init: float = 2.6592  # ln(1/0.07)
    logit_bias_init: float | None = None  # SigLIP: -10
    logit_scale_max: float | None = 4.605170185988092  # ln 100 (CLIP); SigLIP checkpoints exceed it
    audio: AudioConfig | None = None  # set: an audio-text model (encoders/audio_tower.py)
    audio_pool: str = "mean"  # mean over frames | map (attention pooling, as SigLIP's head)
    audio_embed_dim: int | None = 512  # the audio projection's size; must equal the text tower's embed_dim
    version: int = CONFIG_VERSION

    @property
    def modality(self) -> str:
        """Return what the non-text tower reads: "audio" or "image"."""
        return "image" if self.audio is None else "audio"

    @classmethod
    def siglip(cls, vision: VisionConfig, text: TextConfig) -> "DualEncoderConfig":
        """Return a SigLIP config: scale initialised at ln 10, bias at −10, no clamp."""
        return cls(
            vision,
            text,
            "siglip",
            logit_scale_init=2.302585092994046,
            logit_bias_init=-10.0,
            logit_scale_max=None,
        )


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Return `cls` built from `data`, recursing into nested configs and warning about unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=2)
    kwargs = {}
    for name in names & set(data):
        value, hint = data[name], hints[name]
        nested = [h for h in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(h)]
        if len(nested) == 1 and isinstance(value, dict):  # `Config` or `Config | None`
            value = config_from_dict(nested[0], value)
        kwargs[name] = value
    return cls(**kwargs)
