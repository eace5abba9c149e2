"""`mmlm score METRIC predictions.jsonl`: score saved predictions with a VLM metric, print JSON.

Each line of the file is one question:
  {"question_id" | "id": ..., "prediction": "model output",
   "answers": [...] | "label": "B" | "yes", "choices": [...], "type": "...", "objects": [...], "pope_split": "..."}
METRIC is a name in `mmlm.eval.metrics.METRICS` (its usual parser applies unless --parser says otherwise), a
benchmark name users type (`vqav2`, `docvqa`, ...: `mmlm.eval.benchmarks.BENCHMARK_SCORING`) or a built-in task
(`mmlm.eval.tasks.BUILTIN_TASKS`), whose metric and parser are used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows

if TYPE_CHECKING:
    from mmlm.eval.tasks import Sample


def resolve_metric(name: str, parser: str | None = None) -> tuple[str, str]:
    """Return (metric, parser) for a metric, benchmark or built-in task name, `parser` overriding the usual one."""
    from mmlm.eval.benchmarks import BENCHMARK_SCORING
    from mmlm.eval.metrics import METRIC_PARSERS, METRICS
    from mmlm.eval.parsers import PARSERS
    from mmlm.eval.tasks import BUILTIN_TASKS

    if name in METRICS:
        metric, usual = name, METRIC_PARSERS[name]
    elif name in BENCHMARK_SCORING:
        metric, usual = BENCHMARK_SCORING[name].metric, BENCHMARK_SCORING[name].parser
    elif name in BUILTIN_TASKS:
        metric, usual = BUILTIN_TASKS[name].metric, BUILTIN_TASKS[name].parser
    else:
        raise InputError(
            f"unknown metric {name!r}: expected a metric ({', '.join(METRICS)}), "
            f"a benchmark ({', '.join(BENCHMARK_SCORING)}) or a built-in task ({', '.join(BUILTIN_TASKS)})"
        )
    parser = parser or usual
    if parser not in PARSERS:
        raise InputError(f"--parser: expected one of {', '.join(PARSERS)}, got {parser!r}")
    return metric, parser


def _strings(value: Any, field: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f'{where}: "{field}" must be a string or a list of strings, got {value!r}')
    return value


def _check_references(sample: Sample, metric: str, where: str) -> None:
    from mmlm.eval.chair import ground_truth_objects
    from mmlm.eval.metrics import METRIC_REFERENCES

    if METRIC_REFERENCES[metric] == "answers" and not sample.answers:
        raise InputError(f'{where}: {metric} needs "answers", a non-empty list of reference answers')
    if metric == "pope" and str(sample.label).strip().lower() not in ("yes", "no"):
        raise InputError(f'{where}: pope needs "label" "yes" or "no", got {sample.label!r}')
    if metric == "multiple_choice":
        letter = str(sample.label or "").strip().upper()
        n = len(sample.choices) if sample.choices else 26
        if len(letter) != 1 or not "A" <= letter <= chr(ord("A") + n - 1):
            raise InputError(
                f'{where}: multiple_choice needs "label", one of the {n} option letters, got {sample.label!r}'
            )
    if "objects" in sample.meta:
        try:
            ground_truth_objects(sample.meta["objects"], sample.id)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None


def read_predictions(
    path: str | Path, metric: str, keep_types: bool = True
) -> tuple[list[str], list[Sample]]:
    """Return (predictions, Samples) from a predictions JSONL file; InputError names file:line on bad input."""
    from mmlm.eval.tasks import Sample

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    predictions, samples = [], []
    for number, record in jsonl_rows(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        sample_id = record.get("question_id", record.get("id"))
        if sample_id is None or isinstance(sample_id, (dict, list)):
            raise InputError(f'{where}: expected "question_id" or "id"')
        if not isinstance(record.get("prediction"), str):
            raise InputError(f'{where}: expected "prediction", a string, got {record.get("prediction")!r}')
        label = record.get("label")
        if label is not None and not isinstance(label, str):
            raise InputError(f'{where}: "label" must be a string, got {label!r}')
        meta = {}
        if "objects" in record:
            meta["objects"] = _strings(record["objects"], "objects", where)
        if keep_types and record.get("pope_split") is not None:
            meta["pope_split"] = str(record["pope_split"])
        sample = Sample(
            id=str(sample_id),
            question=str(record.get("question", "")),
            answers=_strings(record["answers"], "answers", where) if "answers" in record else [],
            choices=_strings(record["choices"], "choices", where) if "choices" in record else None,
            label=label,
            type=str(record["type"]) if keep_types and record.get("type") is not None else None,
            meta=meta,
        )
        _check_references(sample, metric, where)
        predictions.append(record["prediction"])
        samples.append(sample)
    if not samples:
        raise InputError(f"{path}: no predictions (expected one JSON object per line)")
    return predictions, samples


def score_file(name: str, path: str | Path, parser: str | None = None, types: bool = False) -> dict[str, Any]:
    """Return {"metric", "parser", "predictions", "n", "metrics"} for a predictions file (see the module docstring)."""
    from mmlm.eval.metrics import METRICS
    from mmlm.eval.parsers import PARSERS

    metric, parser = resolve_metric(name, parser)
    predictions, samples = read_predictions(path, metric, keep_types=types)
    parsed = [PARSERS[parser](p, s) for p, s in zip(predictions, samples, strict=True)]
    summary, _ = METRICS[metric](parsed, samples)
    return {
        "metric": metric,
        "parser": parser,
        "predictions": str(path),
        "n": len(samples),
        "metrics": summary,
    }


def cmd_score(args: argparse.Namespace) -> None:
    """Print the metrics of a predictions file as JSON."""
    print(json.dumps(score_file(args.metric, args.predictions, args.parser, args.types), indent=2))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `score` to the command line."""
    p = sub.add_parser("score", help="score a predictions JSONL file with a VLM metric (prints JSON)")
    p.add_argument(
        "metric",
        help="vqa_accuracy | exact_match | anls | relaxed_accuracy | pope | multiple_choice | caption; a "
        "benchmark: vqav2 textvqa docvqa infovqa chartqa pope mmmu mmbench coco-caption; or a built-in task "
        "(its metric and parser)",
    )
    p.add_argument(
        "predictions",
        help='JSONL: {"question_id"|"id", "prediction", "answers"|"label"|"choices", "type"?, "objects"?}',
    )
    p.add_argument(
        "--parser",
        help="vqa | yes_no | option_letter | number | caption | raw (default: the metric's usual one)",
    )
    p.add_argument("--types", action="store_true", help="add figures per question type (and POPE split)")
    p.set_defaults(func=cmd_score)
