"""`mmlm demo --modality video`: a small video VLM on shapes-world clips, reported beside its blind baseline.

Clips of an object moving, appearing, disappearing or changing colour (`mmlm.data.synthetic.videos`) become LLaVA
conversations with `frames` frames each, sampled at segment centres and given to the VLM `video_pool` to an image
slot. It goes on from the image demo's VLM when `--out` holds one (else the `make demo` tower or a fresh ViT, and
a fresh 2-layer LM); a slot's frames are averaged into the MLP connector (the default: one frame a slot), or read
by a perceiver with time embeddings. Each training clip is asked its question, then described. It then answers
questions about test clips written as real MP4 files and read back with PyAV. The evaluation harness scores them
(as `mmlm eval vlm --blind` scores video samples); its blind baseline asks the same questions about a grey
video: what it gets right comes from the question alone.
"""

import json
import time
from pathlib import Path
from typing import Any

import mmlm
from mmlm.data.conversations import llava_record
from mmlm.data.synthetic.videos import VIDEO_KINDS, make_video, write_video
from mmlm.eval.backends import MMLMBackend
from mmlm.eval.harness import evaluate_vlm
from mmlm.eval.tasks import Sample, Task, write_samples
from mmlm.fusion import ConnectorConfig
from mmlm.recipes.demo_vlm import demo_vlm_config
from mmlm.train.config import OptimConfig
from mmlm.train.vlm_config import StageConfig, StageData
from mmlm.train.vlm_loop import run_vlm_training

FRAMES, CLIP_FRAMES, TRAIN_CLIPS, TEST_CLIPS = 4, 16, 2400, 200
# the first seeds of the validation and test clips; training clips take seeds 0, 1, ...
VAL_SEED, TEST_SEED = 2_000_000, 1_000_000
# 1000 steps answer 0.615 on the validation clips where 600 answer 0.580 (seed 0; docs/audio-video.md)
STEPS = 1000
# one frame per image slot through the image VLM's own connector (docs/audio-video.md compares the others)
VIDEO_POOL, VIDEO_MERGE = 1, "mean"
# The second turn of every training conversation. A clip's caption names each of its objects' colour and shape,
# so every clip, not only the appear and disappear quarter, teaches the LM to name a shape from the frames, as
# video instruction sets mix descriptions with questions (Video-ChatGPT, LLaVA-Video). The question comes first,
# so no answer is ever read off a caption in the context. Seed 0, validation clips: 0.600 -> 0.705 (appear
# 0.24 -> 0.36, disappear 0.16 -> 0.46); on 6,000 clips instead of 2,400, 0.655 (docs/audio-video.md).
DESCRIBE = "Describe the video."


def frame_indices(total: int = CLIP_FRAMES, frames: int = FRAMES) -> list[int]:
    """Return the frames at the centres of `frames` equal segments, as `read_video(num_frames=...)` samples."""
    return [int((k + 0.5) * total / frames) for k in range(frames)]


def write_train_set(out: Path, clips: int = TRAIN_CLIPS, frames: int = FRAMES, describe: bool = True) -> Path:
    """Write `clips` training clips as `frames` frame PNGs each (the frames `read_video(num_frames=frames)` would
    take) and a conversations JSON whose "video" entries list them; return the JSON's path. Each conversation asks
    the clip's question, then (`describe`) "Describe the video." with the clip's caption as the answer."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(clips):
        sample = make_video(VIDEO_KINDS[i % len(VIDEO_KINDS)], seed=i, frames=CLIP_FRAMES)
        names = []
        for k, index in enumerate(frame_indices(CLIP_FRAMES, frames)):
            name = f"clip{i:05d}_{k}.png"
            sample.frames[index].save(out / name)
            names.append(name)
        asked = [("<video>\n" + sample.question, sample.answer)]
        if describe:
            asked.append((DESCRIBE, sample.caption))
        messages = [message for question, answer in asked
                    for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]  # fmt: skip
        records.append({"id": i, "video": [names], **llava_record(messages)})
    path = out / "conversations.json"
    path.write_text(json.dumps(records) + "\n")
    return path


def write_test_set(out: Path, clips: int = TEST_CLIPS, first_seed: int = TEST_SEED) -> list[dict[str, Any]]:
    """Write `clips` evaluation clips (seeds from `first_seed`, never used in training) as MP4 files; return their
    questions and answers."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        kind = VIDEO_KINDS[i % len(VIDEO_KINDS)]
        sample = make_video(kind, seed=first_seed + i, frames=CLIP_FRAMES)
        path = write_video(sample.frames, out / f"clip{i:04d}.mp4", fps=8)
        rows.append({"video": str(path), "kind": kind, "question": sample.question, "answer": sample.answer})
    return rows


def demo_video_config(
    out: Path,
    train_json: Path,
    tower: Path | None,
    steps: int,
    video_pool: int = 1,
    frames: int = FRAMES,
    video_merge: str = "mean",
    base: Path | None = None,
):
    """Return the VLM run: the image demo's model (`video_pool` frames per slot, merged by `video_merge`) and its
    recipe on the video conversations. With `base`, the image demo's trained VLM, the run goes on from it (its
    tower, LM, tokenizer and, for the MLP connector, its connector), as video VLMs start from an image one;
    without, the tower comes from `tower` (or is fresh) and the LM is fresh. A fresh connector is first aligned
    alone. The resampler merge swaps the MLP connector for a perceiver (16 latents) with a time embedding per
    frame of a slot."""

    cfg = demo_vlm_config(out, tower, eval_samples=0)
    cfg.model.video_pool, cfg.model.video_merge = video_pool, video_merge
    if video_merge == "resampler":
        cfg.model.connector = ConnectorConfig(
            kind="perceiver", num_queries=16, depth=2, heads=4, max_frames=video_pool
        )
    if base is not None:
        cfg.model.vlm_init, cfg.model.vision_init = str(base), None
    data = StageData(source=str(train_json), multimodal_fraction=1.0, samples=100_000)
    align = StageConfig(steps=min(50, steps), train=["connector"], data=data,
                        optim=OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=10))  # fmt: skip
    instruct = StageConfig(steps=steps, train=["connector", "lm"], data=data,
                           optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=30))  # fmt: skip
    base_cfg = mmlm.load(base).config if base is not None else None
    reused = base_cfg is not None and cfg.model.connector == base_cfg.connector  # nothing to align
    cfg.stages = {"instruct": instruct} if reused else {"align": align, "instruct": instruct}
    slots = -(-frames // video_pool)
    # a slot is the perceiver's 16 latents, or one token per patch of the tower (16 at 32 px, 36 at 48 px);
    # 96 more leave room for the two turns (at most 67 tokens of text over the 2,400 clips with `make demo`'s BPE)
    vision = base_cfg.vision if base_cfg is not None else cfg.model.vision if tower is None else mmlm.load(
        tower).config.vision  # fmt: skip
    per_slot = 16 if video_merge == "resampler" else vision.grid**2
    cfg.batch_size, cfg.max_length, cfg.out_dir = 32, 96 + per_slot * slots, str(out / "video_train")
    return cfg


def score_clips(
    loaded: Any, rows: list[dict[str, Any]], out: Path, frames: int = FRAMES
) -> dict[str, dict[str, float]]:
    """Return {"normal", "blind"}: exact-match accuracy (after VQA normalisation), overall and per clip kind, as the
    evaluation harness scores the test clips (`frames` frames each) and a grey video; samples go to `out`."""

    samples = [Sample(f"{i:04d}", r["question"], answers=[r["answer"]], type=r["kind"], video=r["video"])
               for i, r in enumerate(rows)]  # fmt: skip
    task = Task("shapes-video", str(write_samples(samples, out / "samples.jsonl")), "{question}", "vqa",
                "exact_match", max_new_tokens=8)  # fmt: skip
    backend = MMLMBackend(loaded, "demo-video-vlm", num_frames=frames)
    result = evaluate_vlm(backend, task, samples, batch_size=50, probes=("normal", "blind"), progress=False)
    return {probe: kind_accuracy(r) for probe, r in result["probes"].items()}


def kind_accuracy(probe: dict[str, Any]) -> dict[str, float]:
    """Return one harness probe's exact match as "accuracy" overall and "accuracy_<kind>" per clip kind."""
    out = {"accuracy": probe["metrics"]["exact_match"]}
    out.update({f"accuracy_{kind}": v["exact_match"] for kind, v in probe["by_type"].items()})
    return out


def run_video_demo(
    out: Path,
    steps: int = STEPS,
    train_clips: int = TRAIN_CLIPS,
    test_clips: int = TEST_CLIPS,
    frames: int = FRAMES,
    video_pool: int = VIDEO_POOL,
    video_merge: str = VIDEO_MERGE,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the video VLM on `frames` frames a clip, `video_pool` per image slot merged by `video_merge`, from the
    image demo's VLM in `out` when there is one; score it on validation clips (the ones to tune on) and once on
    the test clips, beside its blind baseline; write <out>/video_summary.json and return it. `seed` seeds the
    weights and the batch order; the clips are the same for every seed."""

    start = time.perf_counter()
    tower, base = out / "vlm_tower", out / "vlm"
    base_ok = (base / "config.json").is_file()
    train_json = write_train_set(out / "video_data" / "train", train_clips, frames)
    val_rows = write_test_set(out / "video_data" / "val", test_clips, first_seed=VAL_SEED)
    rows = write_test_set(out / "video_data" / "test", test_clips)
    cfg = demo_video_config(out, train_json, tower if tower.is_dir() else None, steps, video_pool, frames,
                            video_merge, base if base_ok else None)  # fmt: skip
    cfg.seed = seed
    loaded, records = run_vlm_training(cfg)
    val = score_clips(loaded, val_rows, out / "video_eval" / "val", frames)["normal"]
    scores = score_clips(loaded, rows, out / "video_eval", frames)
    normal, blind = scores["normal"], scores["blind"]
    loaded.save_pretrained(out / "video_vlm")
    summary = {f"video_{k}": v for k, v in normal.items()}
    summary.update({f"video_val_{k}": v for k, v in val.items()})
    summary.update({f"video_blind_{k}": v for k, v in blind.items()})
    summary.update({"video_test_clips": len(rows), "video_frames": frames, "video_pool": video_pool,
                    "video_merge": video_merge, "video_seed": seed,
                    "video_start": "image VLM" if base_ok else "tower",
                    "video_slots": -(-frames // video_pool), "video_steps": records[-1]["step"],
                    "video_seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    print(f"{'clip kind':<12}{'test':>8}{'val':>8}{'blind':>8}")
    for key in ("accuracy", *(f"accuracy_{k}" for k in VIDEO_KINDS if f"accuracy_{k}" in normal)):
        name = "all" if key == "accuracy" else key.removeprefix("accuracy_")
        print(f"{name:<12}{normal[key]:>8.3f}{val.get(key, float('nan')):>8.3f}{blind[key]:>8.3f}")
    print(f"video VLM: accuracy {normal['accuracy']:.3f} on {len(rows)} test clips (MP4, {frames} frames each, "
          f"{video_pool} per slot, {video_merge}; from the {summary['video_start']}), "
          f"blind {blind['accuracy']:.3f}; wrote {out / 'video_vlm'}  ({summary['video_seconds']}s)")  # fmt: skip
    (out / "video_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
