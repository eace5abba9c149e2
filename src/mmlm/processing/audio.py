"""Audio loading and Whisper's log-mel features, matching transformers' `WhisperFeatureExtractor`.

`load_audio` is the boundary: it turns a path, encoded bytes or an array into float32 mono samples in [-1, 1]
at the requested rate, or raises `InputError`. WAV, FLAC, OGG and the other libsndfile formats decode with
soundfile; MP3 and everything else (M4A, WebM, a video's audio track, ...) with PyAV (FFmpeg). Resampling is
soxr's band-limited "HQ" filter, so content above the new Nyquist frequency is removed rather than aliased.

`log_mel_spectrogram` is Whisper's `audio.log_mel_spectrogram` (openai/whisper, whisper/audio.py) on a batch:
pad or trim to 30 s, |STFT|² with a 400-sample periodic Hann window and a 160-sample hop, the last frame dropped,
Slaney mel filters, log10, a floor 8 below each example's maximum, then (x + 4) / 4.
"""

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F

from mmlm.errors import InputError
from mmlm.models.audio_encoder import AudioConfig

SAMPLING_RATE = 16_000
N_FFT = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
CHUNK_LENGTH = 30  # seconds per Whisper window
N_SAMPLES = CHUNK_LENGTH * SAMPLING_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MAX_SECONDS = 600.0

AudioSource = str | os.PathLike | bytes | bytearray | np.ndarray

_PYAV_FORMATS = ("MP3",)  # libsndfile reads MP3 but ignores the encoder delay; FFmpeg trims it
_HF_KEYS = {
    "feature_extractor_type", "processor_class", "feature_size", "sampling_rate", "hop_length", "chunk_length",
    "n_fft", "n_samples", "nb_max_frames", "padding_value", "padding_side", "return_attention_mask", "dither",
    "mel_filters",
}  # fmt: skip


def load_audio(
    source: AudioSource,
    sampling_rate: int = SAMPLING_RATE,
    max_seconds: float | None = MAX_SECONDS,
    *,
    source_sampling_rate: int | None = None,
) -> np.ndarray:
    """Return `source` (a path, encoded bytes or a sample array) as float32 mono samples in [-1, 1] at `sampling_rate`.

    An array is [T] or [T, channels], at `source_sampling_rate` (default: already at `sampling_rate`); integer
    arrays are scaled by their type's range. Audio longer than `max_seconds` is refused, never truncated: pass
    `max_seconds=None` and split with `chunk_audio` to process long recordings.
    """
    if sampling_rate <= 0:
        raise InputError(
            f"sampling_rate: got {sampling_rate}; expected a positive number of samples per second"
        )
    if isinstance(source, np.ndarray):
        name, rate = "<array>", source_sampling_rate or sampling_rate
        samples = _array_to_float(source, name)
        _check_duration(name, samples.shape[0], rate, max_seconds)
    elif isinstance(source, bytes | bytearray):
        if not source:
            raise InputError(
                "<bytes>: got 0 bytes; expected an encoded audio file (WAV, FLAC, OGG, MP3, ...)"
            )
        samples, rate = _decode(lambda: io.BytesIO(source), "<bytes>", max_seconds)
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path}: file not found; expected an audio file")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes); expected an audio file")
        samples, rate = _decode(lambda: path.open("rb"), str(path), max_seconds)
    if samples.shape[0] == 0:
        raise InputError(f"{_name(source)}: contains no audio samples; expected at least one")
    if not np.isfinite(samples).all():  # a float WAV may store them; they would poison the log-mel features
        raise InputError(f"{_name(source)}: samples contain NaN or infinity; expected finite values")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples  # [T, C] -> [T]
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    # Whisper's loader (ffmpeg to s16le) clips the same way; the band-limited resampler can overshoot slightly.
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def chunk_audio(
    audio: np.ndarray, seconds: float = float(CHUNK_LENGTH), sampling_rate: int = SAMPLING_RATE
) -> list[np.ndarray]:
    """Return `audio` [T] split into consecutive windows of `seconds` (the last one shorter), as views."""
    size = round(seconds * sampling_rate)
    if size <= 0:
        raise InputError(f"seconds: got {seconds}; expected a window of at least one sample")
    return [audio[start : start + size] for start in range(0, audio.shape[0], size)]


def _name(source: AudioSource) -> str:
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<bytes>" if isinstance(source, bytes | bytearray) else str(source)


def _check_duration(name: str, frames: int, rate: int, max_seconds: float | None) -> None:
    if max_seconds is not None and frames > max_seconds * rate:
        raise InputError(
            f"{name}: audio lasts {frames / rate:.1f} s, longer than max_seconds={max_seconds:g}; "
            "expected shorter audio (or max_seconds=None and chunk_audio)"
        )


def _array_to_float(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim not in (1, 2):
        raise InputError(
            f"{name}: got an array of shape {array.shape}; expected [samples] or [samples, channels]"
        )
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        # PCM convention (as soundfile): signed full scale is 2^(bits-1); unsigned is centred first
        offset = (int(info.max) + 1) // 2 if info.min == 0 else 0
        return ((array.astype(np.float64) - offset) / ((int(info.max) + 1 - offset) or 1)).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{name}: got an array of dtype {array.dtype}; expected float or integer PCM samples"
        )
    if not np.isfinite(array).all():
        raise InputError(f"{name}: samples contain NaN or infinity; expected finite values")
    return array.astype(np.float32, copy=False)


def _decode(open_stream: Any, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Return ([T, C] float32 samples, rate), trying soundfile first and PyAV for what libsndfile cannot read."""
    with open_stream() as stream:
        try:
            sound = soundfile.SoundFile(stream)
        except (soundfile.LibsndfileError, RuntimeError, TypeError):
            sound = None
        if sound is not None and sound.format not in _PYAV_FORMATS:
            with sound:
                _check_duration(
                    name, sound.frames, sound.samplerate, max_seconds
                )  # from the header, before decoding
                try:
                    samples = sound.read(dtype="float32", always_2d=True)
                except (soundfile.LibsndfileError, RuntimeError) as error:
                    raise InputError(
                        f"{name}: {error}; expected a complete, uncorrupted audio file"
                    ) from error
                return samples, sound.samplerate
        if sound is not None:
            sound.close()
    with open_stream() as stream:
        return _decode_pyav(stream, name, max_seconds)


def _decode_pyav(stream: io.IOBase, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        container = av.open(stream, mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise InputError(f"{name}: not a readable audio file; expected WAV, FLAC, OGG, MP3, ...") from error
    with container:
        if not container.streams.audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise InputError(f"{name}: has no audio stream (found {kinds}); expected a file with audio")
        audio_stream = container.streams.audio[0]
        if audio_stream.codec_context is None:  # a codec id FFmpeg has no decoder for (a damaged header)
            raise InputError(
                f"{name}: audio stream has no decoder in FFmpeg; expected a playable audio track"
            )
        rate = audio_stream.rate or audio_stream.codec_context.sample_rate
        if not rate:
            raise InputError(f"{name}: audio stream declares no sample rate; expected a playable audio track")
        if container.duration is not None:  # microseconds, from the header, before decoding
            _check_duration(name, round(container.duration * rate / 1_000_000), rate, max_seconds)
        # float planar at the stream's own rate and layout; mixing and resampling happen in load_audio
        converter = av.AudioResampler(format="fltp")
        pieces, frames, refused = [], 0, None
        try:
            for packet in container.demux(audio_stream):
                try:
                    decoded = packet.decode()
                except av.InvalidDataError as error:
                    # a damaged packet is skipped, as the ffmpeg command line skips it; the file fails only
                    # if nothing in it decodes (FFmpeg 8 refuses packets that FFmpeg 7 concealed)
                    refused = error
                    continue
                for frame in decoded:
                    for converted in converter.resample(frame):
                        pieces.append(converted.to_ndarray())  # [C, n]
                        frames += pieces[-1].shape[1]
                _check_duration(name, frames, rate, max_seconds)  # headers can lie or be missing
            for converted in converter.resample(None):
                pieces.append(converted.to_ndarray())
            if refused is not None and not pieces:
                raise refused
        except av.FFmpegError as error:
            raise InputError(f"{name}: {error}; expected a complete, uncorrupted audio file") from error
    if not pieces:
        return np.zeros((0, 1), np.float32), rate
    if (
        len({piece.shape[0] for piece in pieces}) > 1
    ):  # the channel count changed mid-stream: mix each to mono
        pieces = [piece.mean(axis=0, keepdims=True) for piece in pieces]
    return np.concatenate(pieces, axis=1).T.astype(np.float32, copy=False), rate


def _hertz_to_mel(hertz: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above
    mels = 3.0 * hertz / 200.0
    log_region = hertz >= 1000.0
    mels[log_region] = 15.0 + np.log(hertz[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    hertz = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    hertz[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - 15.0))
    return hertz


@lru_cache(maxsize=16)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Return the Slaney-scale, Slaney-normalised mel filter bank [n_mels, n_fft // 2 + 1] (float64, read-only)."""
    n_freqs = n_fft // 2 + 1
    edges = np.array([0.0, sampling_rate / 2.0])
    mel_edges = _hertz_to_mel(edges)
    filter_hertz = _mel_to_hertz(
        np.linspace(mel_edges[0], mel_edges[1], n_mels + 2)
    )  # band edges and centres
    fft_hertz = np.linspace(
        0, sampling_rate // 2, n_freqs
    )  # as transformers' mel_filter_bank spaces the bins
    slopes = filter_hertz[None, :] - fft_hertz[:, None]  # [F, n_mels + 2]
    widths = np.diff(filter_hertz)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    triangles = np.maximum(0.0, np.minimum(down, up))  # [F, n_mels]
    triangles *= 2.0 / (filter_hertz[2:] - filter_hertz[:-2])  # Slaney: equal area per band
    bank = np.ascontiguousarray(triangles.T)
    bank.setflags(write=False)
    return bank


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    n_samples: int = N_SAMPLES,
    device: str | torch.device | None = None,
    *,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    sampling_rate: int = SAMPLING_RATE,
) -> torch.Tensor:
    """Return Whisper's log-mel features [B, n_mels, n_samples // hop_length] of 16 kHz audio [B, T] or [T]."""
    waveform = torch.as_tensor(audio, dtype=torch.float32, device=device)
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.dim() != 2:
        raise InputError(f"audio: got shape {tuple(waveform.shape)}; expected [samples] or [batch, samples]")
    length = waveform.shape[-1]
    waveform = waveform[:, :n_samples] if length >= n_samples else F.pad(waveform, (0, n_samples - length))
    window = torch.hann_window(n_fft, periodic=True, device=waveform.device)
    # centred frames with reflect padding, as torch.stft's defaults and Whisper: [B, T] -> [B, F, frames + 1]
    stft = torch.stft(waveform, n_fft, hop_length, window=window, center=True, return_complex=True)
    power = stft[..., :-1].abs().square()  # Whisper drops the last frame: [B, F, frames]
    filters = torch.tensor(
        mel_filters(n_mels, n_fft, sampling_rate), dtype=torch.float32, device=waveform.device
    )
    mel = filters @ power  # [n_mels, F] @ [B, F, frames] -> [B, n_mels, frames]
    log_spec = mel.clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per example, so batching does not change the numbers
    log_spec = torch.maximum(log_spec, peak - 8.0)  # an 80 dB dynamic range
    return (log_spec + 4.0) / 4.0


@dataclass
class WhisperFeatures:
    """Whisper's feature extractor settings; calling it returns log-mel features [B, feature_size, frames]."""

    feature_size: int = 80  # mel bins: 80, or 128 from large-v3 on
    sampling_rate: int = SAMPLING_RATE
    hop_length: int = HOP_LENGTH
    chunk_length: int = CHUNK_LENGTH  # seconds; inputs are padded or trimmed to this
    n_fft: int = N_FFT
    padding_value: float = 0.0

    def __post_init__(self) -> None:
        if self.feature_size <= 0 or self.n_fft <= 0 or self.hop_length <= 0 or self.chunk_length <= 0:
            raise InputError(
                f"feature_size, n_fft, hop_length, chunk_length: got {self.feature_size}, {self.n_fft}, "
                f"{self.hop_length}, {self.chunk_length}; expected positive integers"
            )
        if self.padding_value != 0.0:
            raise InputError(
                f"padding_value: got {self.padding_value}; expected 0.0 (Whisper pads with silence)"
            )

    @property
    def n_samples(self) -> int:
        """Return the number of samples every input is padded or trimmed to."""
        return self.chunk_length * self.sampling_rate

    @property
    def nb_max_frames(self) -> int:
        """Return the number of feature frames per input."""
        return self.n_samples // self.hop_length

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "WhisperFeatures":
        """Return the settings a transformers WhisperFeatureExtractor preprocessor_config.json dict describes."""
        kind = config.get("feature_extractor_type", "WhisperFeatureExtractor")
        if kind != "WhisperFeatureExtractor":
            raise InputError(f"feature_extractor_type: got {kind!r}; expected 'WhisperFeatureExtractor'")
        if unknown := sorted(set(config) - _HF_KEYS):
            warnings.warn(f"preprocessor config: ignoring unknown keys {unknown}", stacklevel=2)
        if config.get("dither", 0.0):
            warnings.warn(
                "preprocessor config: dither is ignored; mmlm's features are deterministic", stacklevel=2
            )
        fields = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value")
        return cls(**{field: config[field] for field in fields if field in config})

    def to_hf(self) -> dict[str, Any]:
        """Return a transformers preprocessor_config.json dict for these settings."""
        return {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": self.feature_size,
            "sampling_rate": self.sampling_rate,
            "hop_length": self.hop_length,
            "chunk_length": self.chunk_length,
            "n_fft": self.n_fft,
            "n_samples": self.n_samples,
            "nb_max_frames": self.nb_max_frames,
            "padding_value": self.padding_value,
            "padding_side": "right",
            "return_attention_mask": False,
        }

    def __call__(
        self, audio: np.ndarray | torch.Tensor, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Return log-mel features [B, feature_size, nb_max_frames] of audio [B, T] or [T] at `sampling_rate`."""
        return log_mel_spectrogram(
            audio,
            self.feature_size,
            self.n_samples,
            device,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            sampling_rate=self.sampling_rate,
        )


def audio_features(
    source: AudioSource,
    n_mels: int,
    n_frames: int,
    *,
    sampling_rate: int = SAMPLING_RATE,
    source_sampling_rate: int | None = None,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
) -> torch.Tensor:
    """Return one clip's log-mel features [1, n_mels, n_frames], padded to the encoder's window.

    A clip longer than the window (n_frames · hop_length samples) is refused, never cut: Whisper would drop the
    rest unseen. Split long audio with `chunk_audio` first.
    """
    samples = load_audio(source, sampling_rate, source_sampling_rate=source_sampling_rate)
    window = n_frames * hop_length
    if len(samples) > window:
        raise InputError(
            f"{_name(source)}: audio lasts {len(samples) / sampling_rate:.1f} s, longer than the encoder's "
            f"{window / sampling_rate:g} s window; split it first (mmlm.processing.audio.chunk_audio)"
        )
    return log_mel_spectrogram(
        samples, n_mels, window, n_fft=n_fft, hop_length=hop_length, sampling_rate=sampling_rate
    )


def audio_batch_features(
    audio: Any, cfg: AudioConfig, preprocessor: dict[str, Any], sampling_rate: int | None = None
) -> torch.Tensor:
    """Return log-mel features [B, n_mels, 2·max_frames] of clips (paths, bytes, 1-D sample arrays, or a list)."""
    clips = list(audio) if isinstance(audio, list | tuple) else [audio]
    if not clips or not all(isinstance(c, str | os.PathLike | bytes | bytearray | np.ndarray) or
                            (isinstance(c, torch.Tensor) and c.dim() == 1) for c in clips):  # fmt: skip
        raise InputError(
            f"audio: expected clips (paths, bytes, 1-D sample arrays, or a list of them) or log-mel features "
            f"[batch, {cfg.n_mels} mels, {cfg.input_frames} frames]; got {type(audio).__name__}"
        )
    rate = preprocessor.get("sampling_rate", 16000)
    options = dict(sampling_rate=rate, source_sampling_rate=sampling_rate,
                   n_fft=preprocessor.get("n_fft", 400), hop_length=preprocessor.get("hop_length", 160))  # fmt: skip
    return torch.cat([
        audio_features(c.numpy() if isinstance(c, torch.Tensor) else c, cfg.n_mels, cfg.input_frames, **options)
        for c in clips
    ])  # fmt: skip
