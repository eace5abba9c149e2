"""A loaded audio encoder (Whisper's): audio or log-mel features in, encoder states out; `encode_audio`,
`save_pretrained`.

Audio (a path, encoded bytes, a 1-D sample array, or a list of those) is decoded and resampled to 16 kHz by
`processing.audio.load_audio` and turned into Whisper's log-mel features by `log_mel_spectrogram`, padded to
the model's window (30 s for 1500 frames). Tensors or arrays of 2 or 3 dimensions are taken as log-mel
features already: [B, n_mels, 2·max_frames] or one clip [n_mels, 2·max_frames].
"""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_whisper import audio_config_from_whisper, encoder_tensors, whisper_encoder_key_map
from mmlm.checkpoints.mmlm_format import load_mmlm_model, write_json
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.base import LoadedModel
from mmlm.json_files import read_json_object
from mmlm.models.audio_encoder import AudioConfig, AudioEncoder, check_features
from mmlm.processing.audio import audio_batch_features

# one clip: a path, encoded bytes or 1-D samples at the preprocessor's rate
AudioSource = str | os.PathLike | bytes | bytearray | np.ndarray | torch.Tensor
AudioInput = AudioSource | Sequence[AudioSource]


def whisper_preprocessor(cfg: AudioConfig) -> dict[str, Any]:
    """Return a WhisperFeatureExtractor preprocessor_config.json dict for `cfg` (16 kHz, 10 ms hop, 25 ms window)."""
    return dict(
        feature_extractor_type="WhisperFeatureExtractor", feature_size=cfg.n_mels, sampling_rate=16000,
        hop_length=160, n_fft=400, chunk_length=cfg.input_frames // 100, n_samples=cfg.input_frames * 160,
        nb_max_frames=cfg.input_frames, padding_value=0.0, return_attention_mask=False,
    )  # fmt: skip


class AudioModel(LoadedModel):
    """A Whisper-style audio encoder ready for use: `encode_audio`, `save_pretrained`."""

    architecture = "audio_encoder"
    reference_weight = "conv1.weight"

    def __init__(self, model: AudioEncoder, preprocessor: dict[str, Any] | None = None) -> None:
        self.model = model
        self.preprocessor = preprocessor or whisper_preprocessor(model.cfg)

    @torch.inference_mode()
    def encode_audio(
        self, audio_or_features: AudioInput, sampling_rate: int | None = None, batch_size: int = 16
    ) -> torch.Tensor:
        """Return encoder states [B, max_frames, D] (fp32, on the model's device) of audio clips or log-mel
        features [B, n_mels, 2·max_frames] (or one clip's [n_mels, 2·max_frames]).

        Sample arrays are at `sampling_rate` (default: the preprocessor's, 16 kHz) and are resampled if not.
        """
        features = self.features(audio_or_features, sampling_rate)
        check_features(features, self.config)
        x = features.to(self.device, self.dtype)
        return torch.cat([self.model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])

    def features(self, audio_or_features: AudioInput, sampling_rate: int | None = None) -> torch.Tensor:
        """Return log-mel features [B, n_mels, frames]: computed from audio, or the given features batched."""
        x = audio_or_features
        if isinstance(x, np.ndarray | torch.Tensor) and x.ndim in (2, 3):
            x = torch.as_tensor(x)
            return x[None] if x.dim() == 2 else x  # one clip: [n_mels, frames] -> [1, n_mels, frames]
        return audio_batch_features(x, self.config, self.preprocessor, sampling_rate)

    def save_pretrained(self, folder: str | Path, format: str = "mmlm") -> Path:
        """Write the encoder to `folder` in mmlm's format (config.json, model.safetensors, preprocessor_config.json):
        the only one, as a lone encoder is no transformers model class; `format="auto"` means the same."""
        return super().save_pretrained(folder, format)

    def _save_files(self, folder: Path) -> None:
        write_json(folder / "preprocessor_config.json", self.preprocessor)


def load_hf_whisper(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> AudioModel:
    """Return the encoder of a transformers Whisper folder (any of its model classes) as an AudioModel."""
    cfg = audio_config_from_whisper(cfg_json)
    weights = encoder_tensors(read_weights(folder), cfg, str(folder))
    rules = whisper_encoder_key_map(cfg)
    model = build_from_weights(lambda: AudioEncoder(cfg), weights, rules, str(folder), device, dtype)
    return AudioModel(model, read_preprocessor(folder, cfg))


def load_mmlm_audio(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> AudioModel:
    """Return an mmlm audio_encoder folder (our config and tensor names) as an AudioModel."""
    model = load_mmlm_model(folder, cfg_json, AudioConfig, AudioEncoder, device, dtype)
    return AudioModel(model, read_preprocessor(folder, model.cfg))


def read_preprocessor(folder: Path, cfg: AudioConfig) -> dict[str, Any]:
    """Return the folder's preprocessor_config.json (Whisper's defaults if absent); its mel count must match."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return whisper_preprocessor(cfg)
    pre = read_json_object(path)
    if pre.get("feature_size", cfg.n_mels) != cfg.n_mels:
        raise InputError(
            f"{path}: feature_size {pre['feature_size']} but config.json has {cfg.n_mels} mel bins"
        )
    return pre
