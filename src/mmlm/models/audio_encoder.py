"""The Whisper audio encoder (Radford et al. 2022): log-mel frames -> two convolutions -> sinusoidal positions
-> pre-norm blocks -> final LayerNorm, plus frame pooling to cut tokens before a projector."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.layers import Transformer
from mmlm.layers.init import initialise, normal_init
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.frame_pooling import mean_frames


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
    init_std: float = 0.02  # std of every fresh Linear and convolution (transformers' WhisperConfig.init_std)
    version: int = CONFIG_VERSION

    @property
    def input_frames(self) -> int:
        """Return the mel frames one input holds (2 · max_frames: the second conv has stride 2)."""
        return 2 * self.max_frames


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Return Whisper's fixed positions [length, channels]: sin then cos halves over geometric timescales."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even channel count, got {channels}")
    # timescales from 1 to max_timescale over channels/2 steps (whisper/model.py `sinusoids`)
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length).view(-1, 1) * inv_timescales.view(1, -1)  # [length, channels/2]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


def check_features(features: torch.Tensor, cfg: AudioConfig) -> None:
    """Raise InputError unless `features` is a log-mel batch [B, n_mels, 2·max_frames]."""
    want = f"[batch, {cfg.n_mels} mels, {cfg.input_frames} frames]"
    if features.dim() != 3:
        raise InputError(f"audio features: expected {want}, got shape {list(features.shape)}")
    if features.shape[1] != cfg.n_mels:
        raise InputError(
            f"audio features: {features.shape[1]} mel bins, the model expects {cfg.n_mels} ({want})"
        )
    if features.shape[2] != cfg.input_frames:
        raise InputError(
            f"audio features: {features.shape[2]} frames, the model expects {cfg.input_frames} "
            f"(pad or trim to {cfg.input_frames // 100} s; {want})"
        )


class AudioEncoder(nn.Module):
    """Whisper's encoder: conv(k3) + GELU, conv(k3, stride 2) + GELU, + sinusoids, pre-norm blocks, LayerNorm."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Fixed, not learned; a persistent buffer so a checkpoint's stored table (transformers saves one) is what
        # runs, bit for bit.
        self.register_buffer("pos_embed", sinusoids(cfg.max_frames, d))
        # Whisper's k projection has no bias. Ours is fused with q and v and has one, loaded as zeros: q·b_k adds
        # the same logit to every key of a query, which softmax cancels, so the output (and b_k's gradient) is
        # unaffected whatever b_k is.
        self.transformer = Transformer(
            cfg.layers, dim=d, heads=cfg.heads, mlp_dim=cfg.mlp_dim, act=cfg.act, eps=cfg.eps
        )
        self.norm_post = nn.LayerNorm(d, eps=cfg.eps)
        # transformers' Whisper `_init_weights`: Linear and Conv1d N(0, init_std²), biases 0, norms identity; the
        # sinusoidal positions are fixed and stay as built
        initialise(self, lambda m: normal_init(m, cfg.init_std))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Return frame tokens plus positions, [B, n_mels, 2T] -> [B, T, D]."""
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))  # [B, D, 2T]
        x = F.gelu(self.conv2(x))  # [B, D, T]
        return x.transpose(1, 2) + self.pos_embed  # [B, T, D]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the encoder states [B, max_frames, D] of log-mel features [B, n_mels, 2·max_frames]."""
        check_features(features, self.cfg)
        x, _ = self.transformer(self.embed(features))
        return self.norm_post(x)


def pool_frames(states: torch.Tensor, factor: int, mode: str = "mean") -> torch.Tensor:
    """Return `states` with every `factor` consecutive frames merged: averaged (`mean`) or concatenated (`stack`).

    [B, T, D] -> [B, T/f, D] (mean) or [B, T/f, D·f] (stack); e.g. Whisper's 1500 frames -> 375 with f = 4.
    """
    if mode not in ("mean", "stack"):
        raise ValueError(f"unknown frame pooling {mode!r}; expected 'mean' or 'stack'")
    b, t, d = states.shape
    if factor < 1 or t % factor:
        raise ValueError(f"cannot pool {t} frames by {factor}: the factor must divide the frame count")
    if mode == "mean":
        return mean_frames(states, factor, dim=1)  # [B, T/f, D]
    return states.reshape(b, t // factor, factor * d)  # [B, T/f, f·D], frame-major
