"""From-scratch CLIP on small real data at a fixed CPU budget: `mmlm train clip`'s defaults against open_clip.

Both sides train the same small ViT/text transformer from scratch on the same real captioned sets, built from
what packages ship (mmlm.data.real_captions: crops of scikit-image's photographs split by quadrant,
scikit-learn's handwritten digits split by sample), for the same CPU time on the same thread count, and
are scored once on the held-out test split (`--split val` while tuning): retrieval R@1/5/10 both ways.

- mmlm: `mmlm.train.run.run_clip_training` with the library's defaults (TrainConfig, OptimConfig, DataConfig),
  only the model size, steps, batch, seed and paths set, and `data.workers=0` so both sides decode in the
  training process. `--mmlm-set key=value` overrides a setting (e.g. an older default).
- open_clip: `open_clip.CLIP` with its own initialisation, its training transform (RandomResizedCrop
  scale (0.9, 1.0)), ClipLoss, and its training script's optimiser recipe: AdamW lr 5e-4, weight decay 0.2 on
  all but gains/biases/logit scale, betas (0.9, 0.98), eps 1e-6, cosine schedule; warmup 10% of the steps (the
  script's 10000 would exceed the whole run). It reads the same BPE ids mmlm trains on the captions (the text
  pools at the end token), so the two differ in recipe, not in tokenizer.

The budget is CPU time: each run first times a few steps (process CPU seconds per step), then trains as many
steps as fit `--seconds`, so a shared, drifting machine gives both sides the same amount of work per second of
CPU. Each (set, seed) runs the two sides in their own processes, in turn, reversing the order every round.

Run in the benchmark environment (open_clip needs torchvision, which mmlm does not):
    make bench-env && OMP_NUM_THREADS=1 .bench-env/bin/python benchmarks/bench_clip_small_data.py
    .venv/bin/python benchmarks/bench_clip_small_data.py --quick   # toy sizes, seconds: checks that it runs
Without open_clip it runs the mmlm side only, says so, and reports no ratio.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    # a ViT a user would pick for CPU: 64-pixel images in 8x8 patches (64 tokens + class), 4 blocks of width 128
    "small": dict(
        image_size=64, patch_size=8, width=128, layers=4, heads=4, context_length=32, embed_dim=128
    ),
    "tiny": dict(image_size=32, patch_size=16, width=32, layers=1, heads=2, context_length=32, embed_dim=16),
}
SETS = ("photos", "digits")
OPEN_CLIP_RECIPE = dict(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, warmup_fraction=0.1)
CALIBRATION_STEPS = 6  # the first two are left out of the per-step time (allocator, first-call costs)


def build_sets(root: Path, quick: bool) -> dict[str, Path]:
    """Build (or reuse) the captioned sets under `root`; return name -> folder."""
    from mmlm.data.real_captions import build_digit_set, build_photo_set

    out = {}
    for name in SETS:
        folder = root / name
        if not (folder / "test.jsonl").exists():
            if name == "photos":
                crops = {"train": 4, "val": 1, "test": 1} if quick else None
                build_photo_set(folder, crops=crops)
            else:
                build_digit_set(folder, copies=1 if quick else 2)
        out[name] = folder
    return out


def mmlm_config(
    m: dict, data: Path, split: str, seed: int, batch: int, steps: int, out: Path, overrides: list[str]
):
    """Return the TrainConfig a user writes for this size: library defaults, only size, data, steps, batch set."""
    from mmlm.train.config import load_train_config

    settings = [
        f"model.vision.image_size={m['image_size']}", f"model.vision.patch_size={m['patch_size']}",
        f"model.vision.width={m['width']}", f"model.vision.layers={m['layers']}",
        f"model.vision.heads={m['heads']}", f"model.vision.mlp_dim={4 * m['width']}",
        f"model.vision.embed_dim={m['embed_dim']}", f"model.text.width={m['width']}",
        f"model.text.layers={m['layers']}", f"model.text.heads={m['heads']}",
        f"model.text.mlp_dim={4 * m['width']}", f"model.text.context_length={m['context_length']}",
        f"model.text.embed_dim={m['embed_dim']}", f"data.source={data / 'train.jsonl'}", "data.workers=0",
        f"val_data={data / f'{split}.jsonl'}", f"steps={steps}", f"batch_size={batch}", f"seed={seed}",
        f"out_dir={out}", "log_every=1", "eval_every=1",
    ]  # fmt: skip
    return load_train_config(None, [*settings, *overrides])


def run_mmlm(args: argparse.Namespace, m: dict, data: Path) -> dict:
    """Calibrate, then train mmlm for the CPU budget and score the split; return its figures."""
    from mmlm.eval.retrieval import read_retrieval_set, retrieval_metrics
    from mmlm.train.run import run_clip_training

    stamps: list[float] = []

    def stamp(model, step: int) -> dict:
        stamps.append(time.process_time())  # called after every optimiser step (eval_every=1, log_every=1)
        return {}

    out = Path(args.out) / f"mmlm-{args.set}-{args.seed}"
    cfg = mmlm_config(m, data, args.split, args.seed, args.batch, CALIBRATION_STEPS, out, args.mmlm_set)
    run_clip_training(cfg, evaluate=stamp)
    per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
    steps = max(1, int(args.seconds / per_step))
    stamps.clear()
    cfg = mmlm_config(m, data, args.split, args.seed, args.batch, steps, out, args.mmlm_set)
    loaded, records = run_clip_training(cfg, evaluate=stamp)
    cpu = per_step if steps == 1 else (stamps[-1] - stamps[0]) * steps / (steps - 1)
    images, texts, text_to_image = read_retrieval_set(str(data / f"{args.split}.jsonl"))
    loaded.model.eval()
    with torch.no_grad():
        scores = retrieval_metrics(loaded.encode_inputs(images), loaded.encode_text(texts), text_to_image)
    return {"steps": steps, "cpu_s": round(cpu, 1), "cpu_s_per_step": round(cpu / steps, 4),
            "final_loss": round(records[-1]["loss"], 4), **scores}  # fmt: skip


def open_clip_model(m: dict, vocab_size: int, eos_id: int, pad_id: int):
    """Return open_clip.CLIP at the benchmark's size, initialised as open_clip does."""
    import open_clip

    return open_clip.CLIP(
        m["embed_dim"],
        vision_cfg=dict(image_size=m["image_size"], patch_size=m["patch_size"], width=m["width"],
                        layers=m["layers"], head_width=m["width"] // m["heads"]),
        text_cfg=dict(vocab_size=vocab_size, context_length=m["context_length"], width=m["width"],
                      layers=m["layers"], heads=m["heads"], pool_type="eos", eos_id=eos_id, pad_id=pad_id),
    )  # fmt: skip


def padded_ids(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """Return the texts' ids [N, length], padded to the full context as open_clip's text tower expects."""
    ids = tokenizer(texts)
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=tokenizer.pad_id)


def open_clip_batches(data: Path, tokenizer, m: dict, batch: int, seed: int):
    """Yield (pixels, ids) batches forever: open_clip's training transform over the train split, reshuffled per epoch."""
    import open_clip
    from PIL import Image

    from mmlm.data.readers import open_pairs

    pairs = list(open_pairs(str(data / "train.jsonl")))
    transform = open_clip.image_transform(m["image_size"], is_train=True)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            chosen = [pairs[i] for i in order[start : start + batch]]
            pixels = torch.stack([transform(Image.open(p.image).convert("RGB")) for p in chosen])
            yield pixels, padded_ids(tokenizer, [p.captions[0] for p in chosen], m["context_length"])


def train_open_clip(m: dict, tokenizer, data: Path, steps: int, batch: int, seed: int):
    """Train open_clip for `steps` steps with its script's recipe; return (model, CPU time after each step, last loss)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip_model(m, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id)
    plain = [p for n, p in model.named_parameters() if p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))]  # fmt: skip
    decay = [p for n, p in model.named_parameters() if all(p is not q for q in plain)]
    r = OPEN_CLIP_RECIPE
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]}, {"params": plain, "weight_decay": 0.0}],
                            lr=r["lr"], betas=r["betas"], eps=r["eps"])  # fmt: skip
    warmup = max(1, int(r["warmup_fraction"] * steps))

    def lr_at(step: int) -> float:  # open_clip_train.scheduler.cosine_lr
        if step < warmup:
            return r["lr"] * (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * r["lr"]

    criterion, batches = open_clip.ClipLoss(), open_clip_batches(data, tokenizer, m, batch, seed)
    stamps = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        pixels, ids = next(batches)
        loss = criterion(*model(pixels, ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        stamps.append(time.process_time())
    return model, stamps, loss.item()


def run_open_clip(args: argparse.Namespace, m: dict, data: Path) -> dict:
    """Calibrate, then train open_clip for the CPU budget and score the split; return its figures."""
    import open_clip
    from PIL import Image

    from mmlm.data.readers import open_pairs
    from mmlm.eval.retrieval import read_retrieval_set, retrieval_metrics
    from mmlm.processing.bpe import train_bpe
    from mmlm.processing.tokenizer import HFTokenizer

    captions = (c for pair in open_pairs(str(data / "train.jsonl")) for c in pair.captions)
    folder = train_bpe(captions, Path(args.out) / f"open_clip-{args.set}-{args.seed}" / "tokenizer", 1024, m["context_length"])  # fmt: skip
    tokenizer = HFTokenizer(folder, context_length=m["context_length"])
    _, stamps, _ = train_open_clip(m, tokenizer, data, CALIBRATION_STEPS, args.batch, args.seed)
    per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
    steps = max(1, int(args.seconds / per_step))
    model, stamps, loss = train_open_clip(m, tokenizer, data, steps, args.batch, args.seed)
    cpu = per_step if steps == 1 else (stamps[-1] - stamps[0]) * steps / (steps - 1)
    images, texts, text_to_image = read_retrieval_set(str(data / f"{args.split}.jsonl"))
    preprocess = open_clip.image_transform(m["image_size"], is_train=False)
    model.eval()
    with torch.no_grad():
        image_emb = model.encode_image(
            torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images]), normalize=True
        )
        text_emb = model.encode_text(padded_ids(tokenizer, texts, m["context_length"]), normalize=True)
    return {"steps": steps, "cpu_s": round(cpu, 1), "cpu_s_per_step": round(cpu / steps, 4),
            "final_loss": round(loss, 4), **retrieval_metrics(image_emb, text_emb, text_to_image)}  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """Run one side on one set and seed; print its figures as one JSON line."""
    torch.set_num_threads(args.threads)
    m, data = MODELS[args.model], Path(args.data) / args.set
    figures = (run_mmlm if args.worker == "mmlm" else run_open_clip)(args, m, data)
    print("RESULT " + json.dumps(figures), flush=True)


def has_open_clip() -> bool:
    """Return whether open_clip imports here; say so when it does not."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print(
            "reference: open_clip not installed; the mmlm side only, no ratio against open_clip",
            file=sys.stderr,
        )
        return False
    return True


def run_side(args: argparse.Namespace, side: str, name: str, seed: int) -> dict:
    """Run one side in its own process; return its figures."""
    command = [sys.executable, __file__, "--worker", side, "--set", name, f"--seed={seed}", f"--model={args.model}",
               f"--seconds={args.seconds}", f"--threads={args.threads}", f"--batch={args.batch}",
               f"--split={args.split}", f"--data={args.data}", f"--out={args.out}"]  # fmt: skip
    command += [f"--mmlm-set={item}" for item in args.mmlm_set]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} on {name} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


KEYS = ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10")  # fmt: skip


def main() -> None:
    """Build the sets, run both sides per set and seed in alternating order, print each run and the summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=180.0, help="CPU seconds of training per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument(
        "--split", choices=("val", "test"), default="test", help="val while tuning; test once"
    )
    parser.add_argument("--data", default="bench-clip-small-data", help="where the captioned sets are built")
    parser.add_argument("--out", default="runs/bench-clip-small-data")
    parser.add_argument("--mmlm-set", action="append", default=[], help="key=value over mmlm's defaults")
    parser.add_argument("--sides", nargs="+", choices=("mmlm", "open_clip"), default=["mmlm", "open_clip"])
    parser.add_argument(
        "--quick", action="store_true", help="toy model and data, 2 CPU seconds: checks that it runs"
    )
    parser.add_argument("--worker", choices=("mmlm", "open_clip"), help=argparse.SUPPRESS)
    parser.add_argument("--set", choices=SETS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.model, args.seconds, args.seeds, args.batch = "tiny", 2.0, [0], 8
        args.data, args.sets = "bench-clip-small-data-quick", ["photos"]
    sides = [s for s in args.sides if s != "open_clip" or has_open_clip()]
    build_sets(Path(args.data), args.quick)
    print(json.dumps({"model": args.model, **MODELS[args.model], "batch": args.batch, "cpu_seconds": args.seconds,
                      "threads": args.threads, "split": args.split, "mmlm_set": args.mmlm_set,
                      "torch": torch.__version__}), flush=True)  # fmt: skip
    results: dict[tuple[str, str], list[dict]] = {}
    for name in args.sets:
        for round_index, seed in enumerate(args.seeds):
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                figures = run_side(args, side, name, seed)
                results.setdefault((name, side), []).append(figures)
                print(json.dumps({"set": name, "side": side, "seed": seed, **figures}), flush=True)
    summary = {}
    for name in args.sets:
        summary[name] = {side: {k: round(statistics.mean(r[k] for r in results[name, side]), 4) for k in KEYS}
                         for side in sides}  # fmt: skip
        if "open_clip" in sides and "mmlm" in sides:
            theirs = summary[name]["open_clip"]["text_to_image_R@10"]
            ours = summary[name]["mmlm"]["text_to_image_R@10"]
            summary[name]["mmlm/open_clip text_to_image_R@10"] = round(ours / theirs, 3) if theirs else None
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
