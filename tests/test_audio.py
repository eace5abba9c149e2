"""Audio loading and Whisper log-mel features: parity with transformers on real speech, resampling, bad files."""

import io
import subprocess
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from mmlm.errors import InputError
from mmlm.processing.audio import (
    N_SAMPLES,
    WhisperFeatures,
    chunk_audio,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
)
from system_programs import require_program

ATOL = 1e-4


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """About a second of synthetic English speech ("a red circle"), decoded and resampled to 16 kHz."""
    require_program("espeak-ng", "espeak-ng")
    path = tmp_path_factory.mktemp("speech") / "red.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "a red circle"], check=True, capture_output=True)
    audio = load_audio(path)
    assert 0.5 < audio.shape[0] / 16000 < 3 and np.abs(audio).max() > 0.1  # it really spoke
    return audio


def _tone(hertz: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hertz * np.arange(round(seconds * rate)) / rate)).astype(
        np.float32
    )


def _peak_hertz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.shape[0])))
    return float(np.fft.rfftfreq(audio.shape[0], 1 / rate)[spectrum.argmax()])


def _hf_features(audio: np.ndarray | list[np.ndarray], n_mels: int) -> np.ndarray:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"]


def _write_with_pyav(path: Path, audio: np.ndarray, rate: int, codec: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            (audio * 32767).astype(np.int16)[None], format="s16", layout="mono"
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# --- mel filters and log-mel parity ---


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers(n_mels: int) -> None:
    theirs = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filters(n_mels), theirs.T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_single_short_speech_matches_whisper_feature_extractor(speech: np.ndarray, n_mels: int) -> None:
    ours = log_mel_spectrogram(speech, n_mels)
    assert ours.shape == (1, n_mels, 3000) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), _hf_features(speech, n_mels), rtol=0, atol=ATOL)
    # transformers' numpy path (float64 STFT) as a second, independent reference
    padded = np.pad(speech, (0, N_SAMPLES - speech.shape[0]))[None]
    numpy_reference = WhisperFeatureExtractor(feature_size=n_mels)._np_extract_fbank_features(padded, "cpu")
    np.testing.assert_allclose(ours.numpy(), numpy_reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batch_matches_whisper_feature_extractor(speech: np.ndarray, n_mels: int) -> None:
    exactly_30s = np.resize(speech, N_SAMPLES)  # the utterance repeated to exactly 480000 samples
    over_30s = np.resize(speech, N_SAMPLES + 16000)  # trimmed to 30 s, as transformers does
    quiet_late = np.concatenate([np.zeros(32000, np.float32), 0.05 * speech])
    batch = [speech, exactly_30s, over_30s, quiet_late]
    stacked = np.stack([np.pad(a[:N_SAMPLES], (0, N_SAMPLES - min(a.shape[0], N_SAMPLES))) for a in batch])
    ours = log_mel_spectrogram(torch.from_numpy(stacked), n_mels)
    assert ours.shape == (4, n_mels, 3000)
    np.testing.assert_allclose(ours.numpy(), _hf_features(batch, n_mels), rtol=0, atol=ATOL)
    # the floor is per example: the quiet row is unaffected by the loud ones
    np.testing.assert_allclose(ours[3:].numpy(), log_mel_spectrogram(quiet_late, n_mels).numpy(), atol=1e-6)


def test_silence_gives_finite_constant_features() -> None:
    features = log_mel_spectrogram(np.zeros(16000, np.float32))
    assert torch.isfinite(features).all()
    assert torch.all(features == (np.log10(1e-10) + 4) / 4)  # every bin at the 1e-10 floor: -1.5


def test_whisper_features_from_hf_config(speech: np.ndarray) -> None:
    config = WhisperFeatureExtractor(feature_size=128).to_dict()  # as whisper-large-v3's preprocessor_config
    features = WhisperFeatures.from_hf(config)
    assert (features.feature_size, features.n_samples, features.nb_max_frames) == (128, N_SAMPLES, 3000)
    np.testing.assert_allclose(features(speech).numpy(), _hf_features(speech, 128), rtol=0, atol=ATOL)
    assert WhisperFeatures.from_hf(features.to_hf()) == features
    with pytest.warns(UserWarning, match="unknown keys \\['colour'\\]"):
        WhisperFeatures.from_hf({**config, "colour": "red"})
    with pytest.raises(InputError, match="feature_extractor_type"):
        WhisperFeatures.from_hf({"feature_extractor_type": "Wav2Vec2FeatureExtractor"})


# --- resampling ---


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resampled_tone_keeps_its_frequency(rate: int) -> None:
    resampled = load_audio(_tone(1000.0, rate), source_sampling_rate=rate)
    assert resampled.shape == (16000,) and resampled.dtype == np.float32
    assert _peak_hertz(resampled, 16000) == 1000.0  # 1 Hz bins over one second
    np.testing.assert_allclose(np.sqrt(np.mean(resampled[1000:-1000] ** 2)), 0.5 / np.sqrt(2), rtol=1e-3)


def test_tone_above_new_nyquist_is_removed_not_aliased() -> None:
    # 12 kHz is above 8 kHz, the Nyquist frequency at 16 kHz; a naive resampler folds it onto 4 kHz.
    original = _tone(12000.0, 44100)
    bound = 1e-6  # energy after / before, away from the 50 ms at each end where the tone switches on and off
    resampled = load_audio(original, source_sampling_rate=44100)
    assert np.mean(resampled[800:-800] ** 2) / np.mean(original**2) < bound  # soxr HQ: about 5e-15
    naive = np.interp(np.arange(16000) * 44100 / 16000, np.arange(44100), original)  # what the test guards
    assert np.mean(naive[800:-800] ** 2) / np.mean(original**2) > bound  # linear interpolation: about 0.6


def test_stereo_is_downmixed_to_the_channel_mean(tmp_path: Path) -> None:
    left = _tone(440.0, 16000)
    stereo = np.stack([left, 0.5 * left], axis=1)  # [T, 2]
    soundfile.write(tmp_path / "stereo.wav", stereo, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav"), 0.75 * left, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo), 0.75 * left, atol=1e-7)


def test_integer_arrays_are_scaled_to_unit_range() -> None:
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    np.testing.assert_allclose(load_audio(pcm), [0.0, 0.5, -1.0, 32767 / 32768])


# --- decoding formats ---


@pytest.mark.parametrize(("suffix", "subtype", "atol"), [("wav", "PCM_16", 1e-4), ("flac", "PCM_16", 1e-4)])
def test_lossless_files_round_trip(tmp_path: Path, suffix: str, subtype: str, atol: float) -> None:
    tone = _tone(440.0, 16000)
    path = tmp_path / f"tone.{suffix}"
    soundfile.write(path, tone, 16000, subtype=subtype)
    np.testing.assert_allclose(load_audio(path), tone, atol=atol)
    np.testing.assert_allclose(load_audio(path.read_bytes()), tone, atol=atol)


def test_ogg_vorbis_decodes(tmp_path: Path) -> None:
    path = tmp_path / "tone.ogg"
    soundfile.write(path, _tone(440.0, 22050), 22050, format="OGG", subtype="VORBIS")
    audio = load_audio(path)
    assert audio.shape == (16000,) and _peak_hertz(audio, 16000) == 440.0


def test_mp3_decodes_with_pyav(tmp_path: Path) -> None:
    path = tmp_path / "tone.mp3"
    _write_with_pyav(path, _tone(440.0, 44100), 44100, "mp3")
    for source in (path, path.read_bytes()):
        audio = load_audio(source)
        assert abs(audio.shape[0] - 16000) < 0.05 * 16000  # the encoder may pad up to a frame
        assert _peak_hertz(audio[:16000], 16000) == pytest.approx(440.0, abs=1.0)
        assert 0.3 < np.sqrt(np.mean(audio[2000:14000] ** 2)) < 0.4  # 0.5 amplitude -> RMS 0.354


# --- bad input ---


def _one_line_error(source, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        load_audio(source, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "file not found" in _one_line_error(tmp_path / "absent.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "file is empty (0 bytes)" in _one_line_error(tmp_path / "empty.wav")
    assert "got 0 bytes" in _one_line_error(b"")
    soundfile.write(tmp_path / "no_frames.wav", np.zeros(0, np.float32), 16000)
    assert "no audio samples" in _one_line_error(tmp_path / "no_frames.wav")
    assert "no audio samples" in _one_line_error(np.zeros(0, np.float32))


def test_corrupt_files(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.wav").write_bytes(noise)
    assert "not a readable audio file" in _one_line_error(tmp_path / "noise.wav")
    (tmp_path / "fake.flac").write_bytes(b"fLaC" + noise)  # right magic number, garbage after it
    message = _one_line_error(tmp_path / "fake.flac")
    assert message.startswith(str(tmp_path / "fake.flac")) and "expected" in message
    assert "NaN" in _one_line_error(np.array([0.0, np.nan], np.float32))


def test_video_without_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    message = _one_line_error(path)
    assert "no audio stream (found video)" in message and "silent_film.mp4" in message


def test_long_audio_is_refused_with_its_duration_then_chunked(tmp_path: Path) -> None:
    path = tmp_path / "ten_minutes_and_a_second.flac"
    soundfile.write(path, np.zeros(601 * 8000, np.int16), 8000)  # silence: a 14 kB FLAC
    assert "audio lasts 601.0 s, longer than max_seconds=600" in _one_line_error(path)
    assert "lasts 2.0 s" in _one_line_error(np.zeros(32000, np.float32), max_seconds=1.0)
    long = load_audio(path, max_seconds=None)
    assert long.shape == (601 * 16000,)
    chunks = chunk_audio(long)
    assert [c.shape[0] for c in chunks] == [N_SAMPLES] * 20 + [16000]


def test_long_audio_through_pyav_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tone.mp3"
    _write_with_pyav(path, _tone(440.0, 16000, seconds=2.0), 16000, "mp3")
    assert "longer than max_seconds=1" in _one_line_error(path, max_seconds=1.0)


def test_decoding_warns_nothing(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "tone.wav", _tone(440.0, 16000), 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_mel_spectrogram(load_audio(tmp_path / "tone.wav"))


def test_encoded_bytes_equal_the_decoded_array() -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, _tone(440.0, 48000), 48000, format="WAV", subtype="FLOAT")
    np.testing.assert_array_equal(
        load_audio(buffer.getvalue()), load_audio(_tone(440.0, 48000), source_sampling_rate=48000)
    )
