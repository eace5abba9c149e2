"""The spoken-word set: espeak-ng speech at 16 kHz, noise at a measured SNR, seeded variants and a manifest."""

import json

import numpy as np
import pytest

from mmlm.data.synthetic.scene import COLORS, SHAPES, WORDS
from mmlm.data.synthetic.spoken import SPOKEN_VOCABULARY, add_noise, make_spoken_set, speak
from mmlm.errors import InputError
from mmlm.processing.audio import SAMPLING_RATE, load_audio
from system_programs import needs_program

needs_espeak = needs_program("espeak-ng", "espeak-ng")
PHRASES = ("red", "circle", "blue star", "seven")


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return float(10 * np.log10(np.mean(np.square(clean, dtype=np.float64)) / np.mean(np.square(noise))))


def test_vocabulary_covers_the_shapes_world():
    assert {"red", "circle", "red circle", "cyan heart", "zero", "nine"} <= set(SPOKEN_VOCABULARY)
    assert set(WORDS) | set(COLORS) | set(SHAPES) <= set(SPOKEN_VOCABULARY)
    assert len(SPOKEN_VOCABULARY) == len(set(SPOKEN_VOCABULARY))


def test_noise_is_added_at_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = (0.3 * np.sin(np.linspace(0, 400, 16000))).astype(np.float32)
    for snr in (0.0, 10.0, 25.0):
        assert abs(_snr_db(clean, add_noise(clean, snr, rng)) - snr) < 1.0
    a, b = add_noise(clean, 10, np.random.default_rng(3)), add_noise(clean, 10, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_missing_binary_is_a_one_line_input_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(InputError, match="espeak-ng") as raised:
        speak("red")
    assert "\n" not in str(raised.value)


@needs_espeak
def test_speech_is_plausible_and_faster_speech_is_shorter():
    slow, fast = speak("red circle", speed_wpm=120), speak("red circle", speed_wpm=260)
    for audio in (slow, fast):
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert 0.2 < audio.shape[0] / SAMPLING_RATE < 3.0
        assert np.abs(audio).max() > 0.1 and np.sqrt(np.mean(np.square(audio))) > 0.01  # not silence
    assert fast.shape[0] < 0.8 * slow.shape[0]


@needs_espeak
def test_distinct_phrases_give_different_audio():
    red, blue = speak("red"), speak("blue")
    length = min(red.shape[0], blue.shape[0])
    assert red.shape != blue.shape or not np.allclose(red, blue)
    assert abs(np.corrcoef(red[:length], blue[:length])[0, 1]) < 0.9
    with pytest.raises(InputError, match="text"):
        speak("  ")


@needs_espeak
def test_spoken_set_manifest_is_deterministic_and_readable(tmp_path):
    manifest = make_spoken_set(tmp_path / "a", PHRASES, variants_per_phrase=3, seed=5, snr_db=(10, 30))
    again = make_spoken_set(tmp_path / "b", PHRASES, variants_per_phrase=3, seed=5, snr_db=(10, 30))
    other = make_spoken_set(tmp_path / "c", PHRASES, variants_per_phrase=3, seed=6, snr_db=(10, 30))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert manifest.read_text() == again.read_text() and manifest.read_text() != other.read_text()
    assert len(rows) == len(PHRASES) * 3
    for row in rows:
        audio = load_audio(manifest.parent / row["audio"])
        np.testing.assert_array_equal(audio, load_audio(again.parent / row["audio"]))
        assert 0.2 < audio.shape[0] / SAMPLING_RATE < 3.0 and np.abs(audio).max() > 0.1
        assert row["text"] == row["answer"] and row["caption"] == f"the spoken words {row['text']}"
        assert row["question"] == ("What words are spoken?" if " " in row["text"] else "What word is spoken?")
    train = [row["variant"] for row in rows if row["split"] == "train"]
    test = [row["variant"] for row in rows if row["split"] == "test"]
    assert len(test) == len(PHRASES) and len(train) == 2 * len(PHRASES)
    # The test split's speed and noise level are unseen in training.
    assert min(v["speed_wpm"] for v in test) > max(v["speed_wpm"] for v in train)
    assert max(v["snr_db"] for v in test) <= min(v["snr_db"] for v in train)
    assert all(10 <= v["snr_db"] <= 30 for v in train + test)


@needs_espeak
def test_spoken_set_noise_matches_the_manifest_snr(tmp_path):
    manifest = make_spoken_set(tmp_path, ("green",), variants_per_phrase=2, seed=1, snr_db=(5, 15))
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        variant = row["variant"]
        noisy = load_audio(tmp_path / row["audio"])
        clean = speak(row["text"], variant["voice"], variant["speed_wpm"], variant["pitch"])
        gain = np.dot(noisy, clean) / np.dot(clean, clean)  # undo the anti-clipping gain, if any
        assert abs(_snr_db(gain * clean, noisy) - variant["snr_db"]) < 1.0


def test_bad_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="variants_per_phrase"):
        make_spoken_set(tmp_path, PHRASES, variants_per_phrase=0)
    with pytest.raises(InputError, match="snr_db"):
        make_spoken_set(tmp_path, PHRASES, snr_db=(30, 10))
