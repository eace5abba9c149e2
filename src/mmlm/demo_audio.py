"""`mmlm demo --modality audio`: a small audio-text CLIP on spoken words, scored by retrieval on held-out speech.

The shapes-world vocabulary is spoken by espeak-ng (`mmlm.data.spoken`) in several variants per phrase; the
test variant of each phrase is faster and noisier than any training clip. A dual encoder with a Whisper-style
audio tower (2 s window, 80 mels) and a small text tower trains with CLIP's loss through `mmlm train clip`'s
loop, then every test clip is matched against every phrase: audio→text R@1 over the vocabulary, and text→audio.
"""

import json
import time
from pathlib import Path
from typing import Any

from mmlm.config import AudioConfig, DualEncoderConfig, TextConfig
from mmlm.data.spoken import make_spoken_set
from mmlm.eval.retrieval import read_audio_retrieval_set, retrieval_metrics
from mmlm.train.config import DataConfig, OptimConfig, TrainConfig

VARIANTS_PER_PHRASE = 8  # 7 train, 1 held-out test


def demo_audio_config(out: Path, manifest: Path, steps: int, width: int = 64) -> TrainConfig:
    """Return the demo's run: a 2 s, 80-mel Whisper-style audio tower, a 2-layer text tower, CLIP's loss."""
    audio = AudioConfig(n_mels=80, width=width, layers=3, heads=4, mlp_dim=2 * width, max_frames=100)
    text = TextConfig(context_length=16, width=width, layers=2, heads=4, mlp_dim=2 * width, act="gelu",
                      embed_dim=width)  # fmt: skip
    model = DualEncoderConfig(text=text, audio=audio, audio_embed_dim=width)
    return TrainConfig(
        model=model, optim=OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=30),
        data=DataConfig(source=str(manifest), split="train"), vocab_size=512, steps=steps, batch_size=64,
        out_dir=str(out / "train"), log_every=10,
    )  # fmt: skip


def evaluate(loaded: Any, manifest: Path) -> dict[str, float]:
    """Return audio→text and text→audio retrieval on the manifest's test clips against every test phrase."""
    clips, texts, text_to_clip = read_audio_retrieval_set(str(manifest), split="test")
    loaded.model.eval()
    metrics = retrieval_metrics(
        loaded.encode_audio(clips), loaded.encode_text(texts), text_to_clip, modality="audio"
    )
    return {**metrics, "test_clips": len(clips), "chance_R@1": 1 / len(texts)}


def run_audio_demo(
    out: Path,
    steps: int = 1200,
    variants_per_phrase: int = VARIANTS_PER_PHRASE,
    phrases: list[str] | None = None,
    width: int = 64,
) -> dict[str, Any]:
    """Synthesise the spoken set, train the audio-text CLIP, evaluate it; write <out>/summary.json and return it."""
    from mmlm.train.run import run_clip_training

    start = time.perf_counter()
    manifest = make_spoken_set(out / "data", phrases, variants_per_phrase=variants_per_phrase)
    loaded, records = run_clip_training(demo_audio_config(out, manifest, steps, width))
    metrics = evaluate(loaded, manifest)
    summary = {
        "audio_to_text_R@1": metrics["audio_to_text_R@1"], "text_to_audio_R@1": metrics["text_to_audio_R@1"],
        "audio_to_text_R@5": metrics["audio_to_text_R@5"], "text_to_audio_R@5": metrics["text_to_audio_R@5"],
        "chance_R@1": metrics["chance_R@1"], "test_clips": metrics["test_clips"],
        "train_clips": metrics["test_clips"] * (variants_per_phrase - 1), "steps": records[-1]["step"],
        "final_loss": records[-1]["loss"], "model": str(out / "train" / "model"),
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    print(f"{'':14}{'R@1':>8}{'R@5':>8}")
    for d in ("audio_to_text", "text_to_audio"):
        print(f"{d:14}{metrics[f'{d}_R@1']:>8.3f}{metrics[f'{d}_R@5']:>8.3f}")
    print(f"audio-text CLIP: {summary['test_clips']} held-out clips (faster, noisier speech) against "
          f"{summary['test_clips']} phrases, chance R@1 {summary['chance_R@1']:.3f}; wrote {summary['model']}  "
          f"({summary['seconds']}s)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
