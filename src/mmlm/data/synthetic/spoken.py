"""Spoken words of the shapes world: the vocabulary synthesised offline with espeak-ng, plus seeded variants.

`speak` runs the `espeak-ng` binary (Debian package espeak-ng) and returns 16 kHz mono float32 samples with the
synthesiser's trailing silence trimmed. `make_spoken_set` writes every phrase of `SPOKEN_VOCABULARY` (or the
given phrases) as several variants (speaking rate, pitch, voice, additive white noise at an SNR) and a
`manifest.jsonl`. The split is by variant: the last variant of each phrase is the test one, drawn from a held-out
band of speaking rates and the noisier half of the SNR range, so test audio has a noise level and speed that no
training clip has. Everything is deterministic given the seed.
"""

import json
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from mmlm.data.synthetic.scene import COLORS, SHAPES, WORDS
from mmlm.data.synthetic.shapes import NUMBER_WORDS
from mmlm.errors import InputError
from mmlm.processing.audio import SAMPLING_RATE, load_audio

__all__ = [
    "SPOKEN_VOCABULARY",
    "add_noise",
    "available_voices",
    "make_spoken_set",
    "speak",
    "spoken_vocabulary",
]

ESPEAK = "espeak-ng"
VOICES = ("en", "en-us")  # the second voice is used only where this espeak-ng install has it
TRAIN_SPEEDS_WPM = (130, 190)
TEST_SPEEDS_WPM = (200, 240)  # held out: no training clip is spoken this fast
PITCHES = (35, 65)  # espeak-ng -p, 0..99
SILENCE_FRACTION = 0.01  # of the peak: quieter samples at the ends count as silence
EDGE_SECONDS = 0.05  # silence kept on either side of the speech
MANIFEST = "manifest.jsonl"


def spoken_vocabulary() -> tuple[str, ...]:
    """Return the phrases to speak: colours, shapes, "<colour> <shape>" pairs, number words and WORDS."""
    colors = tuple(COLORS)
    pairs = tuple(f"{color} {shape}" for color in colors for shape in SHAPES)
    phrases = (*colors, *SHAPES, *pairs, *NUMBER_WORDS, *WORDS)
    return tuple(dict.fromkeys(phrases))  # drop repeats, keep order


SPOKEN_VOCABULARY: tuple[str, ...] = spoken_vocabulary()


def _espeak_binary() -> str:
    binary = shutil.which(ESPEAK)
    if binary is None:
        raise InputError(f"{ESPEAK}: not found on PATH; install the Debian package espeak-ng (make install)")
    return binary


@lru_cache(maxsize=1)
def _installed_voices() -> frozenset[str]:
    listing = subprocess.run([_espeak_binary(), "--voices=en"], capture_output=True, text=True, check=False)
    # Columns: Pty Language Age/Gender VoiceName File Other-languages; the header row is skipped.
    return frozenset(line.split()[1] for line in listing.stdout.splitlines()[1:] if len(line.split()) > 1)


def available_voices() -> tuple[str, ...]:
    """Return the voices of `VOICES` that this espeak-ng install has ("en" always first)."""
    installed = _installed_voices()
    return ("en", *(voice for voice in VOICES[1:] if voice in installed))


def _trim_silence(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) > SILENCE_FRACTION * np.abs(samples).max(initial=0.0))
    if loud.size == 0:
        return samples
    edge = round(EDGE_SECONDS * SAMPLING_RATE)
    return samples[max(loud[0] - edge, 0) : loud[-1] + edge + 1]


def speak(text: str, voice: str = "en", speed_wpm: int = 160, pitch: int = 50) -> np.ndarray:
    """Return `text` spoken by espeak-ng as 16 kHz mono float32 samples [T], end silence trimmed."""
    if not text.strip():
        raise InputError("text: got an empty string; expected words to speak")
    binary = _espeak_binary()
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        # -w writes a WAV with a complete header (--stdout leaves the sizes unset); the text goes in on stdin
        # so a phrase starting with "-" is not read as an option.
        command = [
            binary,
            "-v",
            voice,
            "-s",
            str(int(speed_wpm)),
            "-p",
            str(int(pitch)),
            "-w",
            str(wav),
            "--stdin",
        ]
        result = subprocess.run(command, input=text.encode(), capture_output=True, check=False)
        if result.returncode != 0 or not wav.is_file() or wav.stat().st_size == 0:
            message = result.stderr.decode(errors="replace").strip().replace("\n", " ")
            raise InputError(
                f"{ESPEAK}: failed for voice {voice!r} and text {text!r}: {message or 'no audio'}"
            )
        samples = load_audio(wav, SAMPLING_RATE)  # espeak-ng writes 22.05 kHz; soxr resamples
    return _trim_silence(samples)


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Return `samples` plus white Gaussian noise at exactly `snr_db` dB (mean powers), float32."""
    signal_power = float(np.mean(np.square(samples, dtype=np.float64)))
    noise = rng.standard_normal(samples.shape)
    # SNR = 10 log10(P_signal / P_noise); the drawn noise is rescaled to the target power exactly.
    noise *= np.sqrt(signal_power / 10 ** (snr_db / 10) / np.mean(np.square(noise)))
    return (samples + noise).astype(np.float32)


def _sample_variant(
    rng: np.random.Generator, split: str, voices: tuple[str, ...], snr_db: tuple[float, float]
) -> dict[str, Any]:
    low, high = snr_db
    middle = (low + high) / 2
    speeds, snr_band = (
        (TRAIN_SPEEDS_WPM, (middle, high)) if split == "train" else (TEST_SPEEDS_WPM, (low, middle))
    )
    return {
        "split": split,
        "voice": voices[int(rng.integers(len(voices)))],
        "speed_wpm": int(rng.integers(speeds[0], speeds[1] + 1)),
        "pitch": int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
        "snr_db": round(float(rng.uniform(*snr_band)), 2),
    }


def _file_stem(phrase: str) -> str:
    return "_".join(phrase.split())


def make_spoken_set(
    out_dir: str | Path,
    phrases: tuple[str, ...] | list[str] | None = None,
    variants_per_phrase: int = 3,
    seed: int = 0,
    snr_db: tuple[float, float] = (10, 30),
) -> Path:
    """Write WAVs of each phrase's variants and `manifest.jsonl` under `out_dir`; return the manifest's path.

    With `variants_per_phrase` >= 2 the last variant of each phrase is the test split (faster speech, lower SNR);
    the others are train. Noise for the train split lies in the upper half of `snr_db`, for test the lower half.
    """
    phrases = tuple(SPOKEN_VOCABULARY if phrases is None else phrases)
    if variants_per_phrase < 1:
        raise InputError(f"variants_per_phrase: got {variants_per_phrase}; expected at least 1")
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        raise InputError(f"snr_db: got {snr_db}; expected (low, high) with low <= high, in dB")
    if not phrases or any(not phrase.strip() for phrase in phrases):
        raise InputError("phrases: expected a non-empty list of non-empty phrases")
    stems = [_file_stem(phrase) for phrase in phrases]
    if len(set(stems)) != len(stems):
        raise InputError("phrases: expected distinct phrases; two of them give the same file name")
    out_dir = Path(out_dir)
    voices = available_voices()
    rows = []
    for phrase_index, (phrase, stem) in enumerate(zip(phrases, stems, strict=True)):
        for variant_index in range(variants_per_phrase):
            split = (
                "test" if variants_per_phrase >= 2 and variant_index == variants_per_phrase - 1 else "train"
            )
            rng = np.random.default_rng([seed, phrase_index, variant_index])
            variant = _sample_variant(rng, split, voices, snr_db)
            clean = speak(phrase, variant["voice"], variant["speed_wpm"], variant["pitch"])
            noisy = add_noise(clean, variant["snr_db"], rng)
            noisy /= max(1.0, float(np.abs(noisy).max()))  # avoid clipping; a common gain keeps the SNR
            relative = Path(split) / f"{stem}_{variant_index:02d}.wav"
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(out_dir / relative, noisy, SAMPLING_RATE, subtype="FLOAT")
            rows.append(
                {
                    "audio": relative.as_posix(),
                    "text": phrase,
                    "caption": f"the spoken words {phrase}",
                    "question": "What words are spoken?"
                    if len(phrase.split()) > 1
                    else "What word is spoken?",
                    "answer": phrase,
                    "split": split,
                    "variant": {"index": variant_index, "seed": seed, **variant},
                }
            )
    manifest = out_dir / MANIFEST
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
