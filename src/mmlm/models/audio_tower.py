"""The audio tower of an audio-text dual encoder (CLAP-style): Whisper's encoder, frames pooled, then projected.

Log-mel features [B, n_mels, 2T] -> encoder states [B, T, D] -> one vector per clip [B, D] (mean over frames, or
SigLIP's attention-pooling head) -> a linear projection to the shared embedding size. The encoder's tensors keep
`AudioEncoder`'s names, so a Whisper encoder's weights load into the tower unchanged.
"""

import torch
from torch import nn

from mmlm.layers.init import initialise, normal_linear
from mmlm.models.audio_encoder import AudioConfig, AudioEncoder
from mmlm.models.vision import AttentionPool

AUDIO_POOLS = ("mean", "map")


class AudioTower(AudioEncoder):
    """Whisper's encoder plus frame pooling and a projection: log-mel [B, n_mels, 2T] -> [B, embed_dim]."""

    def __init__(self, cfg: AudioConfig, pool: str = "mean", embed_dim: int | None = 512) -> None:
        super().__init__(cfg)
        if pool not in AUDIO_POOLS:
            raise ValueError(f"unknown audio pooling {pool!r}; expected one of {AUDIO_POOLS}")
        self.pool_mode = pool
        self.attn_pool = (
            AttentionPool(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.eps) if pool == "map" else None
        )
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False) if embed_dim is not None else None
        if self.proj is not None:  # as the image tower's projection (open_clip): N(0, width⁻¹)
            initialise(self.proj, lambda proj: normal_linear(proj, cfg.width**-0.5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return one unnormalised embedding per clip, [B, n_mels, 2T] -> [B, embed_dim]."""
        states = super().forward(features)  # [B, T, D]
        # Padding frames are pooled too: every clip fills the same window, and the encoder sees the silence,
        # so a clip's embedding does not depend on what else is in its batch.
        pooled = self.attn_pool(states) if self.attn_pool is not None else states.mean(1)  # [B, D]
        return self.proj(pooled) if self.proj is not None else pooled
