"""`mmlm eval zeroshot|retrieval|probe`: evaluate a contrastive model, print a table, write JSON."""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mmlm.errors import InputError


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) or v is None]
    width = max(len(k) for k, _ in rows)
    print(title)
    for key, value in rows:
        text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"  {key.ljust(width)}  {text.rjust(10)}")


def _write(out: str | None, result: dict[str, Any], as_json: bool) -> None:
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    if as_json:
        print(json.dumps(result, indent=2))


def cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    """Zero-shot classification of a labelled image set with template-ensembled class prompts."""
    from mmlm.cli import _load
    from mmlm.data.classification import open_labelled_images
    from mmlm.eval.templates import resolve_templates
    from mmlm.eval.zeroshot import evaluate_zero_shot

    data = open_labelled_images(args.data)
    templates = resolve_templates(args.templates)
    model = _load(args)
    started = time.perf_counter()
    png = (
        Path(args.confusion) if args.confusion else (Path(args.out).with_suffix(".png") if args.out else None)
    )
    result = evaluate_zero_shot(model, data, templates, args.batch_size, progress=True, confusion_png=png)
    result = {"task": "zeroshot", "model": args.model, "data": args.data,
              "templates": args.templates or "openai", **result,
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    if not args.json:
        _print_metrics(f"zero-shot: {len(data.images)} images, {len(data.class_names)} classes", result)
        _print_metrics("calibration (softmax of scale · cosine)", result["calibration"])
    _write(args.out, result, args.json)


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    """Image→text and text→image retrieval on an image-text manifest (several captions per image allowed)."""
    from mmlm.cli import _load
    from mmlm.eval.retrieval import read_retrieval_set, retrieval_metrics

    images, texts, text_to_image = read_retrieval_set(args.data, args.limit)
    model = _load(args)
    started = time.perf_counter()
    image_emb = model.encode_image(images, args.batch_size, progress=True)
    text_emb = model.encode_text(texts)
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image)
    result = {"task": "retrieval", "model": args.model, "data": args.data, **metrics,
              "num_images": len(images), "num_texts": len(texts),
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    if not args.json:
        print(f"retrieval: {len(images)} images, {len(texts)} texts")
        ks = [k.split("@")[1] for k in metrics if k.startswith("image_to_text_R@")]
        head = ["R@" + k for k in ks] + ["mean rank", "median rank"]
        print(f"  {'':14}" + "".join(h.rjust(12) for h in head))
        for d in ("image_to_text", "text_to_image"):
            values = [metrics[f"{d}_R@{k}"] for k in ks] + [
                metrics[f"{d}_mean_rank"],
                metrics[f"{d}_median_rank"],
            ]
            print(f"  {d:14}" + "".join(f"{v:12.4f}" for v in values))
    _write(args.out, result, args.json)


def cmd_eval_probe(args: argparse.Namespace) -> None:
    """Logistic-regression probe on frozen image features, C chosen on a validation split."""
    import torch

    from mmlm.cli import _load
    from mmlm.data.classification import open_labelled_images
    from mmlm.eval.linear_probe import linear_probe

    train, test = open_labelled_images(args.train), open_labelled_images(args.test)
    if train.class_names != test.class_names:
        raise InputError(f"{args.train} and {args.test} have different classes")
    model = _load(args)
    started = time.perf_counter()
    train_x = model.encode_image(train.images, args.batch_size, progress=True)
    test_x = model.encode_image(test.images, args.batch_size, progress=True)
    result = linear_probe(train_x, torch.tensor(train.labels), test_x, torch.tensor(test.labels),
                          val_fraction=args.val_fraction, seed=args.seed)  # fmt: skip
    result = {"task": "linear_probe", "model": args.model, "train": args.train, "test": args.test, **result,
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    if not args.json:
        _print_metrics(f"linear probe: {len(train.images)} train / {len(test.images)} test images", result)
    _write(args.out, result, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval zeroshot`, `eval retrieval` and `eval probe` to the command line."""
    from mmlm.cli import _model_args

    group = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)

    p = group.add_parser(
        "zeroshot", help="zero-shot classification: top-1, top-5, per-class recall, calibration"
    )
    _model_args(p)
    p.add_argument(
        "--data", required=True, help='a JSONL manifest {"image", "label"} or a class-per-folder tree'
    )
    p.add_argument("--templates", help="openai (80, default) | simple (7) | a file, one template per line")
    p.add_argument("--out", help="write the results here as JSON (and the confusion matrix beside it as PNG)")
    p.add_argument("--confusion", help="confusion-matrix PNG path (up to 50 classes)")
    p.set_defaults(func=cmd_eval_zeroshot)

    p = group.add_parser("retrieval", help="image-text retrieval: recall@1/5/10 and ranks, both ways")
    _model_args(p)
    p.add_argument("--data", required=True, help='a JSONL manifest {"image", "text": str | [str, ...]}')
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--out", help="write the results here as JSON")
    p.set_defaults(func=cmd_eval_retrieval)

    p = group.add_parser("probe", help="linear probe (logistic regression) on frozen image features")
    _model_args(p)
    p.add_argument("--train", required=True, help="labelled training images (manifest or class folders)")
    p.add_argument("--test", required=True, help="labelled test images, same classes")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of training images used to pick C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results here as JSON")
    p.set_defaults(func=cmd_eval_probe)
