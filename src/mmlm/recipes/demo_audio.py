"""`mmlm demo --modality audio`: a small audio-text CLIP on spoken words, scored by retrieval on held-out speech.

The shapes-world vocabulary is spoken by espeak-ng (`mmlm.data.synthetic.spoken`) in several variants per phrase; the
test variant of each phrase is faster and noisier than any training clip. A dual encoder with a Whisper-style
audio tower (2 s window, 80 mels) and a small text tower trains with CLIP's loss through `mmlm train clip`'s
loop, then every test clip is matched against every phrase: audio→text R@1 over the vocabulary, and text→audio.

Then `<audio>` in an LM: a small audio VLM whose audio encoder is the CLIP's audio tower (frozen, as LLaVA keeps
its CLIP ViT), with 4 frames pooled per token and an MLP connector into a 2-layer LM, learns "What word is
spoken?" on the training clips and answers it for the held-out ones, beside its blind baseline (silence), both
scored by the evaluation harness (`mmlm.eval.harness`, as `mmlm eval vlm --blind` scores audio samples).
"""

import json
import time
from pathlib import Path
from typing import Any

from mmlm.data.synthetic.spoken import make_spoken_set
from mmlm.eval.backends import MMLMBackend
from mmlm.eval.harness import evaluate_vlm
from mmlm.eval.retrieval import read_audio_retrieval_set, retrieval_metrics
from mmlm.eval.tasks import Sample, Task, write_samples
from mmlm.fusion import ConnectorConfig
from mmlm.json_files import jsonl_rows
from mmlm.models.audio_encoder import AudioConfig
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.dual_encoder import DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig
from mmlm.train.config import DataConfig, OptimConfig, TrainConfig
from mmlm.train.run import run_clip_training
from mmlm.train.vlm_config import StageConfig, StageData, VLMParts, VLMTrainConfig
from mmlm.train.vlm_loop import run_vlm_training

VARIANTS_PER_PHRASE = 8  # 7 train, 1 held-out test
VLM_STEPS = 600


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


def manifest_rows(manifest: Path, split: str) -> list[dict[str, Any]]:
    """Return the spoken set's rows of one split, audio paths made absolute."""
    rows = [row for _, row in jsonl_rows(manifest) if row["split"] == split]
    return [{**r, "audio": str(manifest.parent.resolve() / r["audio"])} for r in rows]


def write_spoken_conversations(manifest: Path, out: Path) -> Path:
    """Write the training clips as LLaVA conversations with an `"audio"` file each; return the JSON's path."""
    records = [{"id": i, "audio": r["audio"], "conversations": [
        {"from": "human", "value": "<audio>\n" + r["question"]}, {"from": "gpt", "value": r["answer"]}]}
        for i, r in enumerate(manifest_rows(manifest, "train"))]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "conversations.json").write_text(json.dumps(records) + "\n")
    return out / "conversations.json"


def demo_audio_vlm_config(out: Path, train_json: Path, audio_model: Path, steps: int):
    """Return the audio VLM run: the CLIP's audio tower (frozen), 4 frames a token, an MLP connector, a 2-layer LM (the
    model's vision tower is a minimal unused one)."""

    lm = LMConfig(width=128, layers=2, heads=4, kv_heads=4, mlp_dim=256, tie_word_embeddings=True)
    vision = VisionConfig(
        image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_dim=64, embed_dim=None
    )
    parts = VLMParts(vision=vision, lm=lm, audio_init=str(audio_model), audio_connector=ConnectorConfig(kind="mlp"), audio_pool=4,
                     vocab_size=512)  # fmt: skip
    data = StageData(source=str(train_json), multimodal_fraction=1.0)
    # one stage: with a fresh LM, a connector-only alignment stage has nothing stable to align to
    stages = {"instruct": StageConfig(steps=steps, train=["connector", "lm"], data=data,
                                      optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=30))}  # fmt: skip
    return VLMTrainConfig(model=parts, stages=stages, batch_size=32, max_length=64, eval_samples=0,
                          out_dir=str(out / "vlm_train"), log_every=10, device="cpu")  # fmt: skip


def score_spoken(loaded: Any, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Return the evaluation harness's result for "What word is spoken?" on the clips: normal and blind (one
    second of silence), exact match after VQA normalisation; the samples go to <out>/samples.jsonl."""

    samples = [
        Sample(f"{i:04d}", r["question"], answers=[r["answer"]], audio=r["audio"]) for i, r in enumerate(rows)
    ]
    path = write_samples(samples, out / "samples.jsonl")
    task = Task("spoken-words", str(path), "{question}", "vqa", "exact_match", max_new_tokens=8)
    return evaluate_vlm(MMLMBackend(loaded, "demo-audio-vlm"), task, samples, batch_size=64,
                        probes=("normal", "blind"), progress=False)  # fmt: skip


def run_audio_vlm(out: Path, manifest: Path, audio_model: Path, steps: int = VLM_STEPS) -> dict[str, Any]:
    """Train the spoken-word VLM on the training clips; return its accuracy on the held-out ones and blind."""

    start = time.perf_counter()
    train_json = write_spoken_conversations(manifest, out / "vlm_data")
    loaded, records = run_vlm_training(demo_audio_vlm_config(out, train_json, audio_model, steps))
    result = score_spoken(loaded, manifest_rows(manifest, "test"), out / "vlm_eval")
    probes = result["probes"]
    scores = {"vlm_accuracy": probes["normal"]["metrics"]["exact_match"],
              "vlm_blind_accuracy": probes["blind"]["metrics"]["exact_match"]}  # fmt: skip
    loaded.save_pretrained(out / "vlm")
    return {**scores, "vlm_model": str(out / "vlm"), "vlm_steps": records[-1]["step"],
            "vlm_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def run_audio_demo(
    out: Path,
    steps: int = 1200,
    variants_per_phrase: int = VARIANTS_PER_PHRASE,
    phrases: list[str] | None = None,
    width: int = 64,
    vlm_steps: int = VLM_STEPS,
) -> dict[str, Any]:
    """Synthesise the spoken set, train the audio-text CLIP, evaluate it, then train and score the spoken-word VLM
    on its audio tower (vlm_steps 0: skip it); write <out>/summary.json and return it."""

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
    if vlm_steps:
        summary.update(run_audio_vlm(out, manifest, out / "train" / "model", vlm_steps))
        summary["seconds"] = round(time.perf_counter() - start, 1)
        print(f"audio VLM: \"What word is spoken?\" accuracy {summary['vlm_accuracy']:.3f} on the held-out clips, "
              f"blind (silence) {summary['vlm_blind_accuracy']:.3f}; wrote {summary['vlm_model']}  "
              f"({summary['vlm_seconds']}s)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
