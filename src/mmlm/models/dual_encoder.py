"""The dual encoder behind CLIP and SigLIP: two towers mapped to one unit sphere, compared by cosine.

The non-text tower is a ViT (`visual`) or, when the config has `audio`, an audio tower (`audio`, CLAP-style).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.models.audio_encoder import AudioConfig
from mmlm.models.audio_tower import AudioTower
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.text import TextConfig, TextTransformer
from mmlm.models.vision import VisionConfig, VisionTransformer


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
    audio: AudioConfig | None = None  # set: an audio-text model (models/audio_tower.py)
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


class DualEncoder(nn.Module):
    """Image (or audio) tower f_I and text tower f_T; logits s_ij = exp(t)·⟨f̂_I(x_i), f̂_T(y_j)⟩ (+ b for SigLIP)."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.audio is None:
            self.visual = VisionTransformer(cfg.vision)
        else:
            self.audio = AudioTower(cfg.audio, cfg.audio_pool, cfg.audio_embed_dim)
        self.text = TextTransformer(cfg.text)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        bias = cfg.logit_bias_init
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Return image embeddings [B, D], L2-normalised unless `normalize=False`."""
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_audio(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Return audio embeddings [B, D] of log-mel features [B, n_mels, 2T], L2-normalised unless told not."""
        x = self.audio(features)
        return F.normalize(x, dim=-1) if normalize else x

    @property
    def media_tower(self) -> nn.Module:
        """Return the non-text tower: the ViT, or the audio tower of an audio-text model."""
        return self.visual if self.cfg.audio is None else self.audio

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Return text embeddings [B, D], L2-normalised unless `normalize=False`."""
        x = self.text(ids)
        return F.normalize(x, dim=-1) if normalize else x

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Return image-to-text logits [N, M] from normalised embeddings."""
        logits = self.logit_scale.exp() * image_emb @ text_emb.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def forward(self, inputs: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return normalised (image or audio, text) embeddings for a training batch of pixels or log-mels."""
        media = self.encode_image(inputs) if self.cfg.audio is None else self.encode_audio(inputs)
        return media, self.encode_text(ids)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the learned temperature in [0, logit_scale_max] (CLIP: ln 100); call after each optimiser step."""
        self.logit_scale.clamp_(0, self.cfg.logit_scale_max)
