"""`make demo`: generate the shapes world, train a small CLIP from scratch on CPU, evaluate, summarise; then
train a LLaVA-style VLM on the CLIP's vision tower and report its VQA accuracy (mmlm.recipes.demo_vlm).

Zero-shot runs on colour×shape pairs that no training image or caption contains (compositional
generalisation over all 64 classes; chance is 1/64); retrieval runs on captions that identify their image
uniquely among 500.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmlm.data.synthetic import shapes
from mmlm.eval.retrieval import retrieval_metrics
from mmlm.eval.zeroshot import zero_shot_metrics
from mmlm.inference.contrastive import ContrastiveModel
from mmlm.models.dual_encoder import DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig
from mmlm.recipes.demo_vlm import VLMDemoBudget, run_vlm_demo
from mmlm.train.config import DataConfig, OptimConfig, TrainConfig
from mmlm.train.run import run_clip_training

TEMPLATES = ("a {}", "a photo of a {}", "a small {}", "a large {}")


def demo_config(out: Path, steps: int = 450, image_size: int = 48, patch_size: int = 8) -> TrainConfig:
    """Return the demo's model and training settings: a 4-layer ViT with a conv stem, a 2-layer text tower."""
    vision = VisionConfig(image_size=image_size, patch_size=patch_size, width=128, layers=4, heads=4, mlp_dim=512,
                          act="gelu", embed_dim=128, stem="conv")  # fmt: skip
    text = TextConfig(context_length=32, width=128, layers=2, heads=4, mlp_dim=512, act="gelu", embed_dim=128)
    return TrainConfig(
        model=DualEncoderConfig(vision=vision, text=text),
        optim=OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=50, grad_clip=1.0),
        data=DataConfig(source="shapes"),
        steps=steps, batch_size=256, log_every=10, eval_every=100, vocab_size=512, device="cpu", out_dir=str(out),
    )  # fmt: skip


def write_eval_sets(out: Path, zero_shot: shapes.ZeroShotSet, retrieval: list) -> None:
    """Write the evaluation sets as files `mmlm eval` reads: class folders, a templates file, a manifest."""
    root = out / "zero_shot"
    for name in zero_shot.class_names:  # every class gets a folder, so `mmlm eval` sees all 64
        (root / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
    for i, (sample, label) in enumerate(zip(zero_shot.samples, zero_shot.labels, strict=True)):
        sample.image.save(root / zero_shot.class_names[label].replace(" ", "_") / f"{i:04d}.png")
    (out / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))
    (out / "retrieval").mkdir(exist_ok=True)
    rows = []
    for i, sample in enumerate(retrieval):
        sample.image.save(out / "retrieval" / f"{i:04d}.png")
        rows.append(json.dumps({"image": f"retrieval/{i:04d}.png", "text": sample.caption}) + "\n")
    (out / "retrieval.jsonl").write_text("".join(rows))


# Seed streams of the evaluation sets, apart from each other and from the training stream (seed + 1): the
# validation sets steer the recipe and are scored during training; the test sets are scored once, at the end.
TEST_STREAMS = {"zero_shot": 2, "retrieval": 3, "seen": 4}
VALIDATION_STREAMS = {"zero_shot": 1002, "retrieval": 1003, "seen": 1004}


def shapes_evaluation(image_size: int, seed: int = 0, write_to: Path | None = None, *, validation: bool = False,
                      n_per_class: int = 10, n_retrieval: int = 500):  # fmt: skip
    """Return an evaluate(model, step) function on a held-out zero-shot set and a retrieval set (the test sets,
    or with `validation` the validation sets, drawn from other seed streams), and the number of held-out pairs."""
    streams = VALIDATION_STREAMS if validation else TEST_STREAMS
    train_pairs, heldout = shapes.split_combinations(seed, holdout_fraction=0.25)
    zero_shot = shapes.zero_shot_set(
        n_per_class, heldout, seed=seed + streams["zero_shot"], image_size=image_size
    )
    seen = shapes.zero_shot_set(  # the generalisation gap
        max(1, n_per_class // 3), train_pairs, seed=seed + streams["seen"], image_size=image_size
    )
    retrieval = shapes.retrieval_set(n_retrieval, seed=seed + streams["retrieval"], pairs=train_pairs,
                                     image_size=image_size)  # fmt: skip
    if write_to is not None:
        write_eval_sets(write_to, zero_shot, retrieval)

    def evaluate(loaded: ContrastiveModel, step: int) -> dict[str, float]:
        was_training = loaded.model.training
        loaded.model.eval()
        class_emb = loaded.class_embeddings(zero_shot.class_names, TEMPLATES)
        image_emb = loaded.encode_image([s.image for s in zero_shot.samples], batch_size=256)
        zs = zero_shot_metrics(image_emb @ class_emb.T, torch.tensor(zero_shot.labels))
        seen_emb = loaded.encode_image([s.image for s in seen.samples], batch_size=256)
        zs["seen_top1"] = zero_shot_metrics(seen_emb @ class_emb.T, torch.tensor(seen.labels))["top1"]
        r_img = loaded.encode_image([s.image for s in retrieval], batch_size=256)
        r_txt = loaded.encode_text([s.caption for s in retrieval])
        rt = retrieval_metrics(r_img, r_txt, list(range(len(retrieval))))
        loaded.model.train(was_training)
        return {**{f"zero_shot_{k}": v for k, v in zs.items()}, **rt}

    return evaluate, len(heldout)


def run_demo(out: Path, steps: int = 450, seed: int = 0, vlm_budget: VLMDemoBudget | None = None) -> dict:
    """Run the demo end to end with `seed`; write and return runs/demo/summary.json (`steps`, `vlm_budget`: the
    CLIP's and the VLM's step counts, which a test shrinks to run the whole path in seconds)."""
    start = time.perf_counter()
    cfg = replace(demo_config(out, steps), seed=seed)
    size = cfg.model.vision.image_size
    validate, n_heldout = shapes_evaluation(size, seed, validation=True, n_per_class=6, n_retrieval=300)
    print(f"shapes world: {cfg.data.shapes_samples} training pairs; {n_heldout} colour×shape pairs held out")
    loaded, records = run_clip_training(cfg, evaluate=validate)
    test, _ = shapes_evaluation(size, seed, write_to=out / "eval")
    metrics = test(loaded, cfg.steps)  # the test sets' one scoring
    validation = {
        f"val_{k}": v for k, v in records[-1].items() if k.startswith(("zero_shot", "image_to", "text_to"))
    }
    summary = {
        "zero_shot_top1": metrics["zero_shot_top1"],
        "retrieval_r1_t2i": metrics["text_to_image_R@1"],
        "retrieval_r1_i2t": metrics["image_to_text_R@1"],
        **metrics,
        "zero_shot_heldout_pairs": n_heldout,
        "zero_shot_classes": 64,
        "train_pairs": cfg.data.shapes_samples,
        "steps": cfg.steps,
        "seed": seed,
        "validation": validation,
        "final_loss": records[-1]["loss"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # the README's commands use this image
    example = shapes.Scene((shapes.ShapeObject("square", "blue", "large", 0.5, 0.5),))
    shapes.render(example, cfg.model.vision.image_size).save(out / "example.png")
    print(f"held-out zero-shot top-1 {summary['zero_shot_top1']:.3f} over {n_heldout} unseen colour×shape pairs "
          f"(64 classes, chance {1 / 64:.3f}); on pairs seen in training {metrics['zero_shot_seen_top1']:.3f}")  # fmt: skip
    for direction in ("image_to_text", "text_to_image"):
        print(
            f"retrieval {direction}: "
            + "  ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:.3f}" for k in (1, 5, 10))
        )
    print(
        f"wrote {out / 'summary.json'}, the model in {out / 'model'} and plots in {out}  ({summary['seconds']}s)"
    )
    # the VLM part: the CLIP's vision tower + a tiny LM, LLaVA's stages, VQA accuracy per question type
    summary["clip_seconds"] = summary["seconds"]
    summary.update(run_vlm_demo(out, out / "model", seed, vlm_budget))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'}  (whole demo {summary['seconds']}s)")
    return summary
