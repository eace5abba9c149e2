"""Trained tokens per second of `mmlm train vlm` with packed rows (data.pack) against right-padded batches.

A length-skewed instruction set (see `instruction_set`) trains a tiny VLM (CPU, one thread) from the same initial
weights with AdamW, one step per batch, on four sides:
  padded             the trainer's RowLosses: right padding, the LM run per length group;
  padded_one_group   the same batches, the LM over the whole padded batch (plain padding);
  packed             the same batches packed into rows of max_length (block-diagonal causal mask);
  padded_grouped     the same samples cut into other batches by `data.group_by_length=4`, padded as the trainer
                     (its per-step losses differ: other samples per step).
Each round trains every batch once per side; sides alternate round by round (benchmarks/timing.py). Reported:
real tokens trained per second, medians over rounds with their min-max, the ratio packed / padded (target
>= 1.5), the largest difference of the per-step losses of packed and padded (equal loss: the same samples and
maths), and the token slots the LM runs (padded: per length group, as RowLosses cuts them; packed: rows × width).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_vlm_packing.py --clock cpu # 5 rounds
    PYTHONPATH=src python benchmarks/bench_vlm_packing.py --quick                       # seconds
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from skimage import data as photos

sys.path.insert(0, str(Path(__file__).parent))
from timing import CLOCKS, alternating_rounds, now, use_clock  # noqa: E402

from mmlm.processing.packing import pack_samples  # noqa: E402
from mmlm.train.length_grouping import group_by_length  # noqa: E402
from mmlm.train.vlm_config import vlm_config_from_dict  # noqa: E402
from mmlm.train.vlm_loop import RowLosses, batch_loss, build_tokenizer, build_vlm, length_groups  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
WORDS = [
    "the",
    "red",
    "square",
    "sits",
    "left",
    "of",
    "a",
    "small",
    "blue",
    "circle",
    "near",
    "the",
    "green",
    "triangle",
    "under",
    "one",
    "large",
    "star",
]
MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2, "mlp_dim": 128},
    "lm": {"width": 256, "layers": 4, "heads": 4, "kv_heads": 2, "mlp_dim": 768},
    "vocab_size": 400,
}
KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "audio_features", "image_frames", "image_sizes",
        "position_ids", "segment_ids", "sample_index")  # fmt: skip


def instruction_set(processor, count: int, seed: int) -> list:
    """`count` encoded samples, LLaVA-like in their mix of lengths: a photograph with a short answer (1-3 words,
    50%), a paragraph (10-40 words, 25%) or a long description (60-150 words, 10%); 15% text-only sentences."""
    rng = np.random.default_rng(seed)
    images = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(photos, name)()).convert("RGB")
        w, h = image.size
        images += [image, image.crop((0, 0, w // 2, h)), image.crop((0, 0, w, h // 3))]  # aspect ratios
    samples = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            samples.append(
                processor.encode("", answer=" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))))
            )
            continue
        low, high = (1, 4) if kind < 0.65 else (10, 41) if kind < 0.9 else (60, 151)
        question = "what is the colour of the shape?" if high == 4 else "describe the picture."
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))}]  # fmt: skip
        samples.append(processor.encode(messages, [images[int(rng.integers(len(images)))]]))
    return [s for s in samples if s is not None]


def lm_slots(batch: dict, groups=length_groups) -> int:
    """Return the token slots the LM runs for `batch`: per length group (RowLosses) when padded, rows × width
    when packed."""
    if "segment_ids" in batch:
        return batch["input_ids"].numel()
    lengths = batch["attention_mask"].sum(1)
    return sum(len(rows) * int(lengths[rows].max()) for rows in groups(lengths))


def one_group(lengths: torch.Tensor) -> list[torch.Tensor]:
    """All rows in one group: the LM runs over the whole padded batch, as plain right padding does."""
    return [torch.arange(len(lengths))]


def train(model, batches: list[dict], groups=length_groups) -> tuple[float, list[float]]:
    """Train a copy of `model` one step per batch (the LM's length groups from `groups`); return (seconds,
    per-step losses)."""
    with mock.patch("mmlm.train.vlm_loop.length_groups", groups):
        return train_steps(copy.deepcopy(model).train(), batches)


def train_steps(model, batches: list[dict]) -> tuple[float, list[float]]:
    net = RowLosses(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    start = now()
    for batch in batches:
        row_loss, row_tokens = net(*(batch.get(k) for k in KEYS))
        loss = batch_loss(row_loss, row_tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return now() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pack-length", type=int, default=None, help="tokens per packed row (max_length)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: the thread's CPU time, which other jobs on a shared machine do not inflate")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few batches, one round: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.batch_size, args.rounds = 32, 8, 1
    use_clock(args.clock)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = vlm_config_from_dict(
            {"model": MODEL, "max_length": args.max_length, "out_dir": out, "device": "cpu"}
        )
        model, processor = build_vlm(cfg, build_tokenizer(cfg, Path(out), lambda: [" ".join(WORDS)] * 100))
    model.requires_grad_(True)
    samples = instruction_set(processor, args.samples, seed=0)
    row_length = args.pack_length or args.max_length
    chunks = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    padded = [processor.collate(c, "right") for c in chunks]
    packed = [pack_samples(processor, c, row_length) for c in chunks]
    grouped = []  # data.group_by_length=4: pools of 4 batches' samples cut by length (other batches, same samples)
    for p, start in enumerate(range(0, len(samples), 4 * args.batch_size)):
        pool = samples[start : start + 4 * args.batch_size]
        parts = group_by_length([len(s.input_ids) for s in pool], 4, seed=0, position=p)
        grouped += [processor.collate([pool[i] for i in part], "right") for part in parts if part]
    # padded: the trainer's RowLosses (the LM per length group); padded_one_group: the LM over the whole batch
    sides = {
        "padded": (padded, length_groups),
        "padded_one_group": (padded, one_group),
        "packed": (packed, None),
        "padded_grouped": (grouped, length_groups),
    }
    tokens = sum(len(s.input_ids) for s in samples)
    slots = {name: sum(lm_slots(b, groups) for b in batches) for name, (batches, groups) in sides.items()}
    train(model, padded[:2])  # warm-up: the allocator, the first kernels
    runs = {name: lambda b=batches, g=groups: train(model, b, g or length_groups)
            for name, (batches, groups) in sides.items()}  # fmt: skip
    results = alternating_rounds(runs, args.rounds)
    rates = {name: [tokens / seconds for seconds, _ in runs] for name, runs in results.items()}
    losses = {
        name: runs[0][1] for name, runs in results.items()
    }  # padded_grouped: other batches, other losses
    lengths = [len(s.input_ids) for s in samples]
    for name in sides:
        print(json.dumps({"run": name, "tokens_per_s_median": round(statistics.median(rates[name]), 1),
                          "tokens_per_s_min": round(min(rates[name]), 1),
                          "tokens_per_s_max": round(max(rates[name]), 1),
                          "rows": sum(len(b["input_ids"]) for b in sides[name][0]), "lm_token_slots": slots[name],
                          "first_loss": round(losses[name][0], 6), "last_loss": round(losses[name][-1], 6)}))  # fmt: skip
    summary = {
        "summary": "packed_over_padded",
        "packed_over_unpacked": round(statistics.median(rates["packed"]) / statistics.median(rates["padded"]), 3),
        "grouped_over_unpacked": round(
            statistics.median(rates["padded_grouped"]) / statistics.median(rates["padded"]), 3
        ),
        "packed_over_one_group": round(
            statistics.median(rates["packed"]) / statistics.median(rates["padded_one_group"]), 3
        ),
        "max_step_loss_difference": max(abs(a - b) for a, b in zip(losses["packed"], losses["padded"], strict=True)),
        "samples": len(samples), "steps": len(chunks), "batch_size": args.batch_size,
        "max_length": args.max_length, "pack_length": row_length, "real_tokens": tokens, "rounds": args.rounds,
        "sample_length_median": statistics.median(lengths), "sample_length_max": max(lengths),
        "threads": torch.get_num_threads(), "clock": args.clock, "quick": args.quick,
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
