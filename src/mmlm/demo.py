"""`make demo`: generate the shapes world, train a small CLIP from scratch on CPU, evaluate, summarise.

Zero-shot runs on colour×shape pairs that no training image or caption contains (compositional
generalisation; chance is 1/64); retrieval runs on captions that identify their image uniquely.
"""

import json
import time
from pathlib import Path

import torch

from mmlm.clip import DualEncoder
from mmlm.config import DualEncoderConfig, TextConfig, VisionConfig
from mmlm.contrastive import ContrastiveModel
from mmlm.data import shapes
from mmlm.eval.retrieval import retrieval_metrics
from mmlm.eval.zeroshot import zero_shot_metrics
from mmlm.processing.bpe import train_bpe
from mmlm.processing.image import ImageProcessor
from mmlm.processing.tokenizer import HFTokenizer
from mmlm.train.config import OptimConfig, TrainConfig
from mmlm.train.loop import train
from mmlm.train.memory_data import InMemoryPairs
from mmlm.train.plots import plot_training

IMAGE_SIZE = 32
TEMPLATES = ("a {}", "a photo of a {}", "a small {}", "a large {}")


def demo_config(steps: int = 600) -> TrainConfig:
    """Return the demo's model and training settings: a 32-px ViT-4 and a 3-layer text tower."""
    vision = VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512,
                          act="gelu", embed_dim=128)  # fmt: skip
    text = TextConfig(vocab_size=512, context_length=32, width=128, layers=2, heads=4, mlp_dim=512, act="gelu",
                      embed_dim=128)  # fmt: skip
    model = DualEncoderConfig(vision=vision, text=text)
    optim = OptimConfig(lr=2e-3, weight_decay=0.05, warmup_steps=50, grad_clip=1.0)
    return TrainConfig(model=model, optim=optim, steps=steps, batch_size=256, log_every=10, device="cpu")


def evaluate(loaded: ContrastiveModel, zero_shot: shapes.ZeroShotSet, retrieval: list[shapes.Sample]) -> dict:
    """Return held-out zero-shot and retrieval metrics for the demo model."""
    loaded.model.eval()
    class_emb = loaded.class_embeddings(zero_shot.class_names, TEMPLATES)
    image_emb = loaded.encode_image([s.image for s in zero_shot.samples], batch_size=256)
    zs = zero_shot_metrics(image_emb @ class_emb.T, torch.tensor(zero_shot.labels))
    r_img = loaded.encode_image([s.image for s in retrieval], batch_size=256)
    r_txt = loaded.encode_text([s.caption for s in retrieval])
    rt = retrieval_metrics(r_img, r_txt, list(range(len(retrieval))))
    return {**{f"zero_shot_{k}": v for k, v in zs.items()}, **rt}


def run_demo(out: Path, steps: int = 600, n_train: int = 30_000, seed: int = 0) -> dict:
    """Run the demo end to end and return (and write) runs/demo/summary.json."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, heldout = shapes.split_combinations(seed, holdout_fraction=0.25)
    print(f"shapes world: {len(train_pairs)} colour×shape pairs for training, {len(heldout)} held out")
    samples = list(
        shapes.generate(n_train, seed + 1, pairs=train_pairs, image_size=IMAGE_SIZE, max_objects=3)
    )
    cfg = demo_config(steps)
    tok_dir = train_bpe((s.caption for s in samples), out / "tokenizer", cfg.model.text.vocab_size, 32)
    tokenizer = HFTokenizer(tok_dir, context_length=32)
    cfg.model.text.vocab_size = tokenizer.vocab_size
    cfg.model.text.eos_token_id, cfg.model.text.pad_token_id = tokenizer.eos_id, tokenizer.pad_id
    processor = ImageProcessor.clip(IMAGE_SIZE)
    pixels = processor([s.image for s in samples])
    ids = tokenizer([s.caption for s in samples])
    print(f"generated {n_train} training pairs in {time.perf_counter() - start:.1f}s")

    torch.manual_seed(seed)
    model = DualEncoder(cfg.model)
    loaded = ContrastiveModel(model, tokenizer, processor)
    zero_shot = shapes.zero_shot_set(10, heldout, seed=seed + 2, image_size=IMAGE_SIZE)
    retrieval = shapes.retrieval_set(500, seed=seed + 3, pairs=train_pairs, image_size=IMAGE_SIZE)
    data = InMemoryPairs(pixels, ids, cfg.batch_size, seed)
    (out / "metrics.jsonl").unlink(missing_ok=True)

    def periodic_eval(m: DualEncoder, step: int) -> dict:
        return evaluate(loaded, zero_shot, retrieval)

    cfg.eval_every = max(cfg.steps // 4, 1)
    records = train(cfg, model, data, out, evaluate=periodic_eval)
    metrics = evaluate(loaded, zero_shot, retrieval)
    records[-1].update(metrics)
    loaded.save_pretrained(out / "model")
    plot_training(records, out)
    summary = {
        "zero_shot_top1": metrics["zero_shot_top1"],
        "zero_shot_top5": metrics["zero_shot_top5"],
        "retrieval_r1_t2i": metrics["text_to_image_R@1"],
        "retrieval_r1_i2t": metrics["image_to_text_R@1"],
        **{k: v for k, v in metrics.items() if "_R@" in k or "rank" in k},
        "zero_shot_classes": len(zero_shot.class_names),
        "zero_shot_heldout_pairs": len(heldout),
        "train_pairs": n_train,
        "steps": cfg.steps,
        "final_loss": records[-1]["loss"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"held-out zero-shot top-1 {summary['zero_shot_top1']:.3f} (chance {1 / 64:.3f}) over "
          f"{len(heldout)} unseen colour×shape pairs")  # fmt: skip
    for direction in ("image_to_text", "text_to_image"):
        print(
            f"retrieval {direction}: "
            + "  ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:.3f}" for k in (1, 5, 10))
        )
    print(
        f"wrote {out / 'summary.json'}, the model in {out / 'model'} and plots in {out}  ({summary['seconds']}s)"
    )
    return summary
