"""Ablations of the demo CLIP (`make demo`'s first half): what lifts its held-out zero-shot accuracy.

Each run trains `make demo`'s CLIP (450 steps; about 3-4 minutes on one CPU thread) with the shapes world's
caption settings given, and prints the figures it reaches on the *validation* sets that `make demo` scores
while training (zero-shot over the 64 colour×shape classes on images of the held-out pairs, the same on pairs
seen in training, retrieval R@1 both ways). The test sets are not touched: they are `make demo`'s, scored once.

    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0                           # make demo's settings
    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0 --colourless 0 --partial 0.3   # the old default
    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0 --colourless 0.5
    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 0 --colourless-view greyscale
    .venv/bin/python benchmarks/clip_demo_ablation.py --seed 2 --model runs/demo-seed2/model  # a trained CLIP's
                                                                                         # errors, no training
    .venv/bin/python benchmarks/clip_demo_ablation.py --quick                            # 3 steps: that it runs

--colourless: share of scenes shown without their named colours and with their colour words dropped
(DataConfig.shapes_colourless); --colourless-view: those scenes in random unnamed colours or in greyscale;
--partial: share of one-object scenes captioned by colour or shape alone (DataConfig.shapes_partial_captions).
Every run also prints where the zero-shot errors on the validation images of held-out pairs go (kept colour or
shape, named a seen pair or not, the commonest shape confusions), and how often the shape alone ("a hexagon")
and the colour alone ("something green") are named right, on held-out and on seen pairs: a tower that learnt
each seen pair as a whole names colours right and the shapes of held-out pairs wrong. With --model, only this
analysis runs, on a trained CLIP folder (`make demo`'s runs/demo/model) of the given --seed.
"""

import argparse
import json
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

import mmlm
from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.colours import COLOURLESS_VIEWS
from mmlm.recipes.demo import TEMPLATES, VALIDATION_STREAMS, demo_config, shapes_evaluation
from mmlm.train.config import DataConfig
from mmlm.train.run import run_clip_training


def error_analysis(model, seed: int, image_size: int, n_per_class: int = 6) -> dict:
    """Return where the held-out zero-shot errors on the validation images go, and shape-alone and colour-alone
    accuracy on held-out and seen pairs."""
    model.model.eval()
    train, heldout = shapes.split_combinations(seed, holdout_fraction=0.25)
    classes = shapes.all_pairs()
    class_emb = model.class_embeddings([f"{c} {s}" for c, s in classes], TEMPLATES)
    shape_emb = model.class_embeddings(list(shapes.SHAPES), ("a {}",))
    colour_emb = model.class_embeddings(list(shapes.COLORS), ("something {}",))
    out: dict = {}
    for name, pairs, stream in (("heldout", heldout, "zero_shot"), ("seen", train, "seen")):
        images = shapes.zero_shot_set(
            n_per_class, pairs, seed=seed + VALIDATION_STREAMS[stream], image_size=image_size
        )
        truth = [classes[label] for label in images.labels]
        emb = model.encode_image([s.image for s in images.samples], batch_size=256)
        named = [classes[i] for i in (emb @ class_emb.T).argmax(1).tolist()]
        shape = [shapes.SHAPES[i] for i in (emb @ shape_emb.T).argmax(1).tolist()]
        colour = [list(shapes.COLORS)[i] for i in (emb @ colour_emb.T).argmax(1).tolist()]
        out[f"{name}_top1"] = round(sum(p == t for p, t in zip(named, truth, strict=True)) / len(truth), 3)
        out[f"{name}_shape_alone"] = round(
            sum(p == t[1] for p, t in zip(shape, truth, strict=True)) / len(truth), 3
        )
        out[f"{name}_colour_alone"] = round(
            sum(p == t[0] for p, t in zip(colour, truth, strict=True)) / len(truth), 3
        )
        if name == "heldout":
            errors = [(p, t) for p, t in zip(named, truth, strict=True) if p != t]
            out["heldout_errors"] = len(errors)
            out["errors_kept_colour"] = sum(p[0] == t[0] for p, t in errors)
            out["errors_kept_shape"] = sum(p[1] == t[1] for p, t in errors)
            out["errors_named_seen_pair"] = sum(p in train for p, _ in errors)
            confusions = Counter(f"{t[1]}->{p[1]}" for p, t in errors if p[1] != t[1])
            out["shape_confusions"] = dict(confusions.most_common(5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colourless", type=float, default=DataConfig.shapes_colourless)
    parser.add_argument("--colourless-view", choices=COLOURLESS_VIEWS,
                        default=DataConfig.shapes_colourless_view)  # fmt: skip
    parser.add_argument("--partial", type=float, default=DataConfig.shapes_partial_captions)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="a trained demo CLIP folder: print its error analysis, train nothing")
    parser.add_argument("--quick", action="store_true", help="3 steps, 200 scenes, small validation sets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        loaded = mmlm.load(args.model)
        size = loaded.config.vision.image_size
        print(json.dumps({"seed": args.seed, "model": args.model, **error_analysis(loaded, args.seed, size)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(demo_config(Path(tmp), steps=3 if args.quick else 450), seed=args.seed)
        data = replace(cfg.data, shapes_colourless=args.colourless, shapes_partial_captions=args.partial,
                       shapes_colourless_view=args.colourless_view)  # fmt: skip
        if args.quick:
            data = replace(data, shapes_samples=200)
            cfg = replace(cfg, batch_size=32, eval_every=3, log_every=1)
        cfg = replace(cfg, data=data)
        size = cfg.model.vision.image_size
        validate, _ = shapes_evaluation(size, args.seed, validation=True, n_per_class=1 if args.quick else 6,
                                        n_retrieval=20 if args.quick else 300)  # fmt: skip
        start = time.perf_counter()
        loaded, records = run_clip_training(cfg, evaluate=validate)
    errors = error_analysis(loaded, args.seed, size, n_per_class=1 if args.quick else 6)
    last = records[-1]
    print(json.dumps({
        "seed": args.seed, "colourless": args.colourless,
        "colourless_view": args.colourless_view, "partial": args.partial, "threads": args.threads,
        "steps": cfg.steps, "val_zero_shot_top1": round(last["zero_shot_top1"], 3),
        "val_zero_shot_seen_top1": round(last["zero_shot_seen_top1"], 3),
        "val_image_to_text_R@1": round(last["image_to_text_R@1"], 3),
        "val_text_to_image_R@1": round(last["text_to_image_R@1"], 3),
        "seconds": round(time.perf_counter() - start, 1), **errors,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
