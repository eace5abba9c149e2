"""`mmlm eval zeroshot|retrieval|probe`: evaluate a contrastive model, print a table, write JSON;
`mmlm eval vlm`: answer VQA-style tasks with a generative model under image probes (`mmlm.eval.harness`)."""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mmlm.cli.model_args import add_device_args, add_model_args, add_revision_arg, load_model
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
    from mmlm.data.classification import open_labelled_images
    from mmlm.eval.templates import resolve_templates
    from mmlm.eval.zeroshot import evaluate_zero_shot

    data = open_labelled_images(args.data)
    templates = resolve_templates(args.templates)
    model = load_model(args)
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
    """Image→text and text→image retrieval on an image-text manifest (several captions per image allowed), or
    audio→text and text→audio on a manifest whose rows carry "audio" clips."""
    from mmlm.eval.retrieval import read_any_retrieval_set, retrieval_metrics

    options = {"split": args.split} if args.split else {}
    modality, inputs, texts, text_to_input = read_any_retrieval_set(args.data, args.limit, **options)
    model = load_model(args)
    if getattr(model, "modality", None) != modality:
        raise InputError(
            f"{args.data} holds {modality}-text pairs, but {args.model} is not an {modality}-text contrastive model"
        )
    started = time.perf_counter()
    media_emb = model.encode_inputs(inputs, args.batch_size, progress=True)
    text_emb = model.encode_text(texts)
    metrics = retrieval_metrics(media_emb, text_emb, text_to_input, modality=modality)
    counts = {"num_audio" if modality == "audio" else "num_images": len(inputs), "num_texts": len(texts)}
    result = {"task": "retrieval", "model": args.model, "data": args.data, **metrics, **counts,
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    if not args.json:
        noun = "clips" if modality == "audio" else "images"
        print(f"retrieval: {len(inputs)} {noun}, {len(texts)} texts")
        ks = [k.split("@")[1] for k in metrics if k.startswith(f"{modality}_to_text_R@")]
        head = ["R@" + k for k in ks] + ["mean rank", "median rank"]
        print(f"  {'':14}" + "".join(h.rjust(12) for h in head))
        for d in (f"{modality}_to_text", f"text_to_{modality}"):
            values = [metrics[f"{d}_R@{k}"] for k in ks] + [
                metrics[f"{d}_mean_rank"],
                metrics[f"{d}_median_rank"],
            ]
            print(f"  {d:14}" + "".join(f"{v:12.4f}" for v in values))
    _write(args.out, result, args.json)


def cmd_eval_probe(args: argparse.Namespace) -> None:
    """Logistic-regression probe on frozen image features, C chosen on a validation split."""
    import torch

    from mmlm.data.classification import open_labelled_images
    from mmlm.eval.linear_probe import linear_probe

    train, test = open_labelled_images(args.train), open_labelled_images(args.test)
    if train.class_names != test.class_names:
        raise InputError(f"{args.train} and {args.test} have different classes")
    model = load_model(args)
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


def _vlm_backend(args: argparse.Namespace):
    from mmlm.eval.backends import MMLMBackend, OpenAIBackend, TransformersBackend

    if args.endpoint:
        api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        return OpenAIBackend(args.endpoint, api_key, args.served_model, concurrency=args.batch_size)
    if args.transformers:
        return TransformersBackend(args.transformers, args.device, args.dtype)
    return MMLMBackend.load(args.model, args.device, args.dtype, args.frames, args.revision)


def cmd_eval_vlm(args: argparse.Namespace) -> None:
    """Answer VQA-style tasks under normal / blind / shuffled / text-only images; write results and a report."""
    from mmlm.eval.generation_cache import GenerationCache
    from mmlm.eval.harness import evaluate_vlm
    from mmlm.eval.report import format_table, write_results
    from mmlm.eval.tasks import load_task
    from mmlm.processing.ocr import tesseract_path

    specs = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not specs:
        raise InputError("--tasks: expected a comma-separated list of tasks, e.g. shapes-vqa,pope")
    for name, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--max-new-tokens", args.max_new_tokens, 1)):  # fmt: skip
        if value is not None and value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.ocr and tesseract_path() is None:
        raise InputError("--ocr needs the tesseract binary (apt-get install tesseract-ocr)")
    tasks = [
        load_task(spec, args.limit, args.data_cache) for spec in specs
    ]  # bad task names fail before loading
    backend = _vlm_backend(args)
    probes = ["normal"] + [p for p, on in (("blind", args.blind), ("shuffled", args.shuffled),
                                           ("text_only", args.text_only)) if on]  # fmt: skip
    started = time.perf_counter()
    cache_path = Path(args.cache) if args.cache else Path(args.out) / "generations.sqlite"
    with GenerationCache(cache_path) as cache:
        try:
            results = [
                evaluate_vlm(backend, task, samples, args.batch_size, probes, args.ocr, cache, progress=True,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
                for task, samples in tasks
            ]  # fmt: skip
        except KeyboardInterrupt:
            print(
                f"interrupted: finished batches are in {cache_path}; the same command resumes",
                file=sys.stderr,
            )
            raise
    source = args.model or args.transformers or args.endpoint
    run = {"model": backend.name, "source": source, "tasks_requested": specs, "limit": args.limit,
           "probes": probes, "ocr": args.ocr, "batch_size": args.batch_size, "seed": args.seed,
           "decoding": {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens or "per task"},
           "device": args.device, "dtype": args.dtype, "cache": str(cache_path),
           "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    paths = write_results(args.out, run, results)
    print(f"wrote {paths['results']}, {paths['samples'].name} and {paths['report'].name}", file=sys.stderr)
    if args.json:
        print(paths["results"].read_text(), end="")
    else:
        print(format_table(results))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval zeroshot`, `eval retrieval`, `eval probe` and `eval vlm` to the command line."""
    group = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)

    p = group.add_parser(
        "zeroshot", help="zero-shot classification: top-1, top-5, per-class recall, calibration"
    )
    add_model_args(p)
    p.add_argument(
        "--data", required=True, help='a JSONL manifest {"image", "label"} or a class-per-folder tree'
    )
    p.add_argument("--templates", help="openai (80, default) | simple (7) | a file, one template per line")
    p.add_argument("--out", help="write the results here as JSON (and the confusion matrix beside it as PNG)")
    p.add_argument("--confusion", help="confusion-matrix PNG path (up to 50 classes)")
    p.set_defaults(func=cmd_eval_zeroshot)

    p = group.add_parser(
        "retrieval", help="image-text (or audio-text) retrieval: recall@1/5/10 and ranks, both ways"
    )
    add_model_args(p)
    p.add_argument(
        "--data", required=True, help='a JSONL manifest {"image" or "audio", "text": str | [str, ...]}'
    )
    p.add_argument("--limit", type=int, help="use only the first N images (or clips)")
    p.add_argument("--split", help='only rows whose "split" is this (audio manifests; Karpathy JSON)')
    p.add_argument("--out", help="write the results here as JSON")
    p.set_defaults(func=cmd_eval_retrieval)

    p = group.add_parser("probe", help="linear probe (logistic regression) on frozen image features")
    add_model_args(p)
    p.add_argument("--train", required=True, help="labelled training images (manifest or class folders)")
    p.add_argument("--test", required=True, help="labelled test images, same classes")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of training images used to pick C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results here as JSON")
    p.set_defaults(func=cmd_eval_probe)

    p = group.add_parser(
        "vlm", help="VQA-style tasks for a generative VLM, with blind / shuffled image probes"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an mmlm or transformers LLaVA folder or hub id, run by mmlm")
    source.add_argument("--endpoint", help="an OpenAI-compatible server URL (POST {URL}/v1/chat/completions)")
    source.add_argument(
        "--transformers", help="any transformers image-text-to-text folder, run by transformers"
    )
    add_revision_arg(p)
    p.add_argument("--api-key", help="bearer token for --endpoint (default: $OPENAI_API_KEY)")
    p.add_argument("--served-model", help="model name for --endpoint (default: the first of /v1/models)")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated built-in tasks (shapes-vqa, shapes-pope, ...) or task files",
    )
    p.add_argument("--limit", type=int, help="use only the first N samples of each task")
    p.add_argument("--blind", action="store_true",
                   help="also run with a grey image of the same size (silence for audio, a grey video for video)")  # fmt: skip
    p.add_argument("--shuffled", action="store_true", help="also run with another sample's image")
    p.add_argument("--text-only", action="store_true", help="also run with no image at all")
    p.add_argument("--ocr", action="store_true", help="put Tesseract's text of the image in the prompt")
    p.add_argument(
        "--frames", type=int, default=8, help="frames sampled from each video sample (--model only)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    add_device_args(p)
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: each task's own)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled probe's image derangement")
    p.add_argument("--cache", help="generation cache (SQLite; default OUT/generations.sqlite)")
    p.add_argument("--data-cache", help="where built-in tasks are generated (default: runs/eval_data)")
    p.add_argument("--out", required=True, help="folder for results.json, samples.jsonl and report.md")
    p.add_argument("--json", action="store_true", help="print results.json instead of a table")
    p.set_defaults(func=cmd_eval_vlm)
