"""Whisper log-mel throughput: mmlm's batched torch features vs transformers' WhisperFeatureExtractor.

Each input is 30 s of 16 kHz audio (one Whisper window; the cost does not depend on the content). Reports the
median over `--repeats` runs of seconds of audio featurised per wall-clock second, for mmlm's
`log_mel_spectrogram`, transformers' `WhisperFeatureExtractor.__call__` (its torch STFT path, the default when
torch is installed) and its numpy path (`_np_extract_fbank_features`, float64 STFT), then the ratios.

    .venv/bin/python benchmarks/bench_audio.py --batches 1 16 --repeats 5
"""

import argparse
import json
import platform

import numpy as np
import torch
import transformers
from timing import median_seconds
from transformers import WhisperFeatureExtractor

from mmlm.processing.audio import CHUNK_LENGTH, N_SAMPLES, log_mel_spectrogram


def main() -> None:
    """Print one JSON line per batch size with audio-seconds per second for each implementation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-mels", type=int, default=80)
    args = parser.parse_args()

    extractor = WhisperFeatureExtractor(feature_size=args.n_mels)
    rng = np.random.default_rng(0)
    for batch in args.batches:
        audio = (0.1 * rng.standard_normal((batch, N_SAMPLES))).astype(np.float32)
        as_list = list(audio)
        runs = {
            "mmlm": lambda audio=audio: log_mel_spectrogram(audio, args.n_mels),
            "transformers_call": lambda as_list=as_list: extractor(
                as_list, sampling_rate=16000, return_tensors="np"
            ),
            "transformers_numpy": lambda audio=audio: extractor._np_extract_fbank_features(audio, "cpu"),
        }
        seconds = {name: median_seconds(run, args.repeats) for name, run in runs.items()}
        audio_seconds = batch * CHUNK_LENGTH
        speed = {name: round(audio_seconds / s, 1) for name, s in seconds.items()}
        result = {
            "batch": batch,
            "n_mels": args.n_mels,
            "repeats": args.repeats,
            "audio_seconds_per_second": speed,
            "mmlm_over_transformers_call": round(speed["mmlm"] / speed["transformers_call"], 2),
            "mmlm_over_transformers_numpy": round(speed["mmlm"] / speed["transformers_numpy"], 2),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
