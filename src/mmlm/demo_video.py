"""`mmlm demo --modality video`: a small video VLM on shapes-world clips, reported beside its blind baseline.

Clips of an object moving, appearing, disappearing or changing colour (`mmlm.data.videos`) become LLaVA
conversations with FRAMES frames each, sampled at segment centres; the demo's VLM recipe trains on them (the
`make demo` tower when it exists, else a fresh ViT; a 2-layer LM; an MLP connector), and answers questions about
test clips written as real MP4 files and read back with PyAV (`generate(videos=...)`). The blind baseline asks
the same questions with grey frames: what it gets right comes from the question alone.
"""

import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from mmlm.data.videos import VIDEO_KINDS, make_video, write_video
from mmlm.eval.vqa import exact_match

FRAMES, CLIP_FRAMES, TRAIN_CLIPS, TEST_CLIPS = 4, 16, 2400, 200


def frame_indices(total: int = CLIP_FRAMES, frames: int = FRAMES) -> list[int]:
    """Return the frames at the centres of `frames` equal segments, as `read_video(num_frames=...)` samples."""
    return [int((k + 0.5) * total / frames) for k in range(frames)]


def write_train_set(out: Path, clips: int = TRAIN_CLIPS) -> Path:
    """Write `clips` training clips as frame PNGs and a conversations JSON; return the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(clips):
        sample = make_video(VIDEO_KINDS[i % len(VIDEO_KINDS)], seed=i, frames=CLIP_FRAMES)
        names = []
        for k, index in enumerate(frame_indices()):
            name = f"clip{i:05d}_{k}.png"
            sample.frames[index].save(out / name)
            names.append(name)
        records.append({"id": i, "image": names, "conversations": [
            {"from": "human", "value": "<image>" * FRAMES + "\n" + sample.question},
            {"from": "gpt", "value": sample.answer}]})  # fmt: skip
    path = out / "conversations.json"
    path.write_text(json.dumps(records) + "\n")
    return path


def write_test_set(out: Path, clips: int = TEST_CLIPS, first_seed: int = 1_000_000) -> list[dict[str, Any]]:
    """Write `clips` test clips (seeds never used in training) as MP4 files; return their questions and answers."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        kind = VIDEO_KINDS[i % len(VIDEO_KINDS)]
        sample = make_video(kind, seed=first_seed + i, frames=CLIP_FRAMES)
        path = write_video(sample.frames, out / f"clip{i:04d}.mp4", fps=8)
        rows.append({"video": str(path), "kind": kind, "question": sample.question, "answer": sample.answer})
    return rows


def demo_video_config(out: Path, train_json: Path, tower: Path | None, steps: int):
    """Return the VLM run: the image demo's model and a two-stage recipe on the video conversations."""
    from mmlm.demo_vlm import demo_vlm_config
    from mmlm.train.config import OptimConfig
    from mmlm.train.vlm_config import StageConfig, StageData

    cfg = demo_vlm_config(out, tower, eval_samples=0)
    data = StageData(source=str(train_json), multimodal_fraction=1.0, samples=100_000)
    cfg.stages = {
        "align": StageConfig(steps=min(50, steps), train=["connector"], data=data,
                             optim=OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=10)),
        "instruct": StageConfig(steps=steps, train=["connector", "lm"], data=data,
                                optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=30)),
    }  # fmt: skip
    cfg.batch_size, cfg.max_length, cfg.out_dir = 32, 128, str(out / "video_train")
    return cfg


def answer(loaded: Any, rows: list[dict[str, Any]], blind: bool, batch_size: int = 50) -> list[str]:
    """Return greedy answers to the test questions, from the clips' frames or from grey frames (batched)."""
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if blind:
            prompts = [
                [{"role": "user", "content": "<image>" * FRAMES + "\n" + r["question"]}] for r in chunk
            ]
            answers += loaded.generate(prompts, [[grey] * FRAMES] * len(chunk), max_new_tokens=8)
        else:
            prompts = [[{"role": "user", "content": "<video>\n" + r["question"]}] for r in chunk]
            answers += loaded.generate(prompts, videos=[[r["video"]] for r in chunk], num_frames=FRAMES,
                                       max_new_tokens=8)  # fmt: skip
    return answers


def accuracy(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Return exact-match accuracy (after VQA normalisation), overall and per clip kind."""
    hits = [float(exact_match(a, r["answer"])) for a, r in zip(answers, rows, strict=True)]
    out = {"accuracy": sum(hits) / len(hits)}
    for kind in VIDEO_KINDS:
        of_kind = [h for h, r in zip(hits, rows, strict=True) if r["kind"] == kind]
        out[f"accuracy_{kind}"] = sum(of_kind) / len(of_kind)
    return out


def run_video_demo(
    out: Path, steps: int = 600, train_clips: int = TRAIN_CLIPS, test_clips: int = TEST_CLIPS
) -> dict[str, Any]:
    """Train the video VLM, evaluate it and its blind baseline; write <out>/video_summary.json and return it."""
    from mmlm.train.vlm_loop import run_vlm_training

    start = time.perf_counter()
    tower = out / "vlm_tower"
    train_json = write_train_set(out / "video_data" / "train", train_clips)
    rows = write_test_set(out / "video_data" / "test", test_clips)
    loaded, records = run_vlm_training(
        demo_video_config(out, train_json, tower if tower.is_dir() else None, steps)
    )
    normal, blind = accuracy(answer(loaded, rows, False), rows), accuracy(answer(loaded, rows, True), rows)
    loaded.save_pretrained(out / "video_vlm")
    summary = {f"video_{k}": v for k, v in normal.items()}
    summary.update({f"video_blind_{k}": v for k, v in blind.items()})
    summary.update({"video_test_clips": len(rows), "video_frames": FRAMES, "video_steps": records[-1]["step"],
                    "video_seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    print(f"{'clip kind':<12}{'with frames':>12}{'blind':>8}")
    for key in ("accuracy", *(f"accuracy_{k}" for k in VIDEO_KINDS)):
        name = "all" if key == "accuracy" else key.removeprefix("accuracy_")
        print(f"{name:<12}{normal[key]:>12.3f}{blind[key]:>8.3f}")
    print(f"video VLM: accuracy {normal['accuracy']:.3f} on {len(rows)} test clips (MP4, {FRAMES} frames each), "
          f"blind {blind['accuracy']:.3f}; wrote {out / 'video_vlm'}  ({summary['video_seconds']}s)")  # fmt: skip
    (out / "video_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
