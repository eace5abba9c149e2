"""Whisper log-mel throughput: mmlm's batched torch features vs transformers' WhisperFeatureExtractor.

Each input is 30 s of 16 kHz audio (one Whisper window; the cost does not depend on the content). The three
implementations run in interleaved rounds (timing.py: the order reverses every round) after one untimed call
each: mmlm's `log_mel_spectrogram`, transformers' `WhisperFeatureExtractor.__call__` (its torch STFT path,
the default when torch is installed) and its numpy path (`_np_extract_fbank_features`, float64 STFT). Reports
seconds of audio featurised per wall-clock second (median, min, max over rounds) and the ratios of medians.

    .venv/bin/python benchmarks/bench_audio.py --batches 1 16 --repeats 9
    .venv/bin/python benchmarks/bench_audio.py --quick      # batch 1, 2 rounds: checks that it runs
"""

import argparse
import json
import platform

import numpy as np
import torch
import transformers
from timing import interleaved_seconds, rate_spread, ratio_of_medians
from transformers import WhisperFeatureExtractor

from mmlm.processing.audio import CHUNK_LENGTH, N_SAMPLES, log_mel_spectrogram


def main() -> None:
    """Print one JSON line per batch size with audio-seconds per second for each implementation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-mels", type=int, default=80)
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 rounds: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = [1], 2

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
        seconds = interleaved_seconds(runs, args.repeats)
        audio_seconds = batch * CHUNK_LENGTH
        result = {
            "batch": batch,
            "n_mels": args.n_mels,
            "rounds": args.repeats,
            "audio_seconds_per_second": {name: rate_spread(s, audio_seconds) for name, s in seconds.items()},
            # a rate's ratio is the inverse ratio of seconds
            "mmlm_over_transformers_call": ratio_of_medians(seconds["transformers_call"], seconds["mmlm"], 2),
            "mmlm_over_transformers_numpy": ratio_of_medians(
                seconds["transformers_numpy"], seconds["mmlm"], 2
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
