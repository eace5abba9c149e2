"""Converters from public VLM benchmarks' own files to `Sample`s, and `convert`, which writes a converted set
as a task folder (samples.jsonl + task.json) that `mmlm.eval.tasks.load_task` reads like any task file.

Each converter is a pure function of the files as published (field names as in the official releases) and the
folder holding the images; image paths become absolute, so the written samples.jsonl can live anywhere.
Prompts follow LLaVA-1.5's evaluation scripts (Liu et al. 2024, "Improved Baselines with Visual Instruction
Tuning", appendix): a short-answer suffix for VQA-style sets, the option-letter instruction for MMBench.
"""

import csv
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmlm.data.readers import coco_caption_groups
from mmlm.errors import InputError
from mmlm.eval.tasks import (
    DEFAULT_CACHE_DIR,
    LETTERS,
    MULTIPLE_CHOICE_PROMPT,
    Sample,
    Task,
    read_task,
    write_samples,
)
from mmlm.json_files import json_field, json_items, jsonl_rows, read_json

SHORT_ANSWER_PROMPT = "{question}\nAnswer the question using a single word or phrase."
CAPTION_QUESTION = "Provide a one-sentence caption for the provided image."  # lmms-eval's COCO prompt
VQAV2_IMAGE_PATTERN = "COCO_val2014_{image_id:012d}.jpg"
POPE_SPLITS = ("adversarial", "popular", "random")


# ---- reading the public files ----


def _image(image_dir: str | Path, name: str) -> str:
    return os.path.abspath(os.path.join(image_dir, str(name)))


def _answers(values: Any, where: str) -> list[str]:
    if not isinstance(values, list):
        raise InputError(f"{where}: answers: expected a list, got {values!r:.80}")
    return [str(v["answer"] if isinstance(v, dict) and "answer" in v else v) for v in values]


# ---- converters ----


def vqav2(
    questions_json: str | Path,
    annotations_json: str | Path | None,
    image_dir: str | Path,
    image_pattern: str = VQAV2_IMAGE_PATTERN,
) -> list[Sample]:
    """Return VQA v2 samples: 10 human answers each (none without annotations, as for test-dev), type = answer_type."""
    questions = json_items(read_json(questions_json), "questions", questions_json)
    annotations: dict[Any, Any] = {}
    if annotations_json is not None:
        for i, item in enumerate(json_items(read_json(annotations_json), "annotations", annotations_json)):
            annotations[json_field(item, "question_id", f"{annotations_json}: annotations[{i}]")] = item
    samples = []
    for i, item in enumerate(questions):
        where = f"{questions_json}: questions[{i}]"
        question_id, image_id = json_field(item, "question_id", where), json_field(item, "image_id", where)
        try:
            image = _image(image_dir, image_pattern.format(image_id=int(image_id)))
        except (TypeError, ValueError):
            raise InputError(f"{where}: image_id: expected an integer, got {image_id!r}") from None
        sample = Sample(str(question_id), json_field(item, "question", where), image,
                        meta={"question_id": question_id, "image_id": image_id})  # fmt: skip
        if annotations_json is not None:
            if question_id not in annotations:
                raise InputError(f"{annotations_json}: no annotation for question_id {question_id} ({where})")
            annotation = annotations[question_id]
            sample.answers = _answers(json_field(annotation, "answers", where), where)
            sample.type = annotation.get("answer_type")  # "yes/no", "number", "other": VQA's per-type scores
            for key in ("question_type", "multiple_choice_answer"):
                if key in annotation:
                    sample.meta[key] = annotation[key]
        samples.append(sample)
    return samples


def gqa(questions_json: str | Path, image_dir: str | Path) -> list[Sample]:
    """Return GQA samples (balanced questions, a dict keyed by question id); type = the structural type."""
    data = read_json(questions_json)
    if not isinstance(data, dict):
        raise InputError(f"{questions_json}: expected a JSON object keyed by question id")
    samples = []
    for question_id, item in data.items():
        where = f"{questions_json}: {question_id}"
        image_id = json_field(item, "imageId", where)
        types = item.get("types") or {}
        sample = Sample(str(question_id), json_field(item, "question", where), _image(image_dir, f"{image_id}.jpg"),
                        type=types.get("structural"), meta={"image_id": image_id})  # fmt: skip
        if "answer" in item:
            sample.answers = [str(item["answer"])]
        for key, value in (("semantic", types.get("semantic")), ("detailed", types.get("detailed")),
                           ("full_answer", item.get("fullAnswer"))):  # fmt: skip
            if value is not None:
                sample.meta[key] = value
        samples.append(sample)
    return samples


def textvqa(json: str | Path, image_dir: str | Path) -> list[Sample]:
    """Return TextVQA samples ({"data": [...]}), 10 human answers each (none in the test set)."""
    samples = []
    for i, item in enumerate(json_items(read_json(json), "data", json)):
        where = f"{json}: data[{i}]"
        image_id = json_field(item, "image_id", where)
        sample = Sample(str(json_field(item, "question_id", where)), json_field(item, "question", where),
                        _image(image_dir, f"{image_id}.jpg"), meta={"image_id": image_id})  # fmt: skip
        if "answers" in item:
            sample.answers = _answers(item["answers"], where)
        samples.append(sample)
    return samples


def docvqa(json: str | Path, image_dir: str | Path) -> list[Sample]:
    """Return DocVQA samples ({"data": [...]}, image paths relative to the dataset folder); answers all accepted."""
    samples = []
    for i, item in enumerate(json_items(read_json(json), "data", json)):
        where = f"{json}: data[{i}]"
        sample = Sample(str(json_field(item, "questionId", where)), json_field(item, "question", where),
                        _image(image_dir, json_field(item, "image", where)))  # fmt: skip
        if "answers" in item:
            sample.answers = _answers(item["answers"], where)
        for key, meta_key in (("docId", "doc_id"), ("question_types", "question_types")):
            if key in item:
                sample.meta[meta_key] = item[key]
        samples.append(sample)
    return samples


def chartqa(json: str | Path, image_dir: str | Path) -> list[Sample]:
    """Return ChartQA samples (a list of imgname, query, label); type = the file's stem (test_human, test_augmented)."""
    samples = []
    kind = Path(json).stem
    for i, item in enumerate(json_items(read_json(json), None, json)):
        where = f"{json}: [{i}]"
        image = json_field(item, "imgname", where)
        sample = Sample(f"{kind}-{i}", json_field(item, "query", where), _image(image_dir, image),
                        [str(json_field(item, "label", where))], type=kind, meta={"imgname": image})  # fmt: skip
        samples.append(sample)
    return samples


def pope(jsonl: str | Path, image_dir: str | Path, split: str | None = None) -> list[Sample]:
    """Return POPE samples from its JSON-lines file; the split (random/popular/adversarial) comes from the file name."""
    split = split or next((s for s in POPE_SPLITS if s in Path(jsonl).name), None)
    samples = []
    for number, item in jsonl_rows(jsonl):
        where = f"{jsonl}:{number}"
        label = str(json_field(item, "label", where)).strip().lower()
        if label not in ("yes", "no"):
            raise InputError(f"{where}: label: expected yes or no, got {item['label']!r}")
        image = json_field(item, "image", where)
        meta = {"image": image, **({"pope_split": split} if split else {})}
        sample = Sample(f"{split or 'pope'}-{json_field(item, 'question_id', where)}", json_field(item, "text", where),
                        _image(image_dir, image), [label], label=label, type=split, meta=meta)  # fmt: skip
        samples.append(sample)
    return samples


def coco_captions(json: str | Path, image_dir: str | Path) -> list[Sample]:
    """Return one sample per COCO image (captions_val2014.json) with all its reference captions."""
    return [
        Sample(
            str(image_id),
            CAPTION_QUESTION,
            _image(image_dir, name),
            [str(c).strip() for c in captions],
            meta={"image_id": image_id},
        )  # fmt: skip
        for image_id, name, captions in coco_caption_groups(read_json(json), json)
    ]


def multiple_choice(path: str | Path) -> list[Sample]:
    """Return MMBench/MMStar/MMMU-style TSV samples: options in columns A, B, ..., `answer` the letter, base64 images.

    As LLaVA's MMBench evaluation, a non-empty `hint` goes before the question. An image cell holding only
    another row's index (MMBench repeats images that way) is replaced by that row's image.
    """
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images run past csv's default 128 KiB per field
    try:
        with Path(path).open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file, delimiter="\t")
            header = next(reader, None) or []
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    finally:
        csv.field_size_limit(previous_limit)
    missing = [c for c in ("index", "question", "A", "B") if c not in header]
    if missing:
        raise InputError(f"{path}:1: header lacks column(s) {missing}; expected index, question, A, B, ...")
    option_columns = [c for c in LETTERS if c in header]
    records = []
    for line, row in rows:
        if len(row) != len(header):
            raise InputError(f"{path}:{line}: expected {len(header)} tab-separated cells, got {len(row)}")
        records.append((line, dict(zip(header, row, strict=True))))
    images = {cells["index"]: cells.get("image", "") for _, cells in records}
    samples = []
    for line, cells in records:
        choices = []
        for letter in option_columns:  # options run A, B, ... up to the first empty cell
            if not cells[letter].strip() or cells[letter] == "nan":
                break
            choices.append(cells[letter])
        if len(choices) < 2:
            raise InputError(f"{path}:{line}: expected at least the options A and B, got {len(choices)}")
        answer = cells.get("answer", "").strip() or None
        if answer is not None and answer not in LETTERS[: len(choices)]:
            raise InputError(
                f"{path}:{line}: answer: expected a letter A-{LETTERS[len(choices) - 1]}, got {answer!r}"
            )
        hint = cells.get("hint", "")
        question = f"{hint}\n{cells['question']}" if hint.strip() and hint != "nan" else cells["question"]
        image = cells.get("image", "") or None
        if image is not None and len(image) <= 64 and image in images:
            image = images[image] or None
        known = {"index", "question", "hint", "answer", "image", "category", *option_columns}
        meta = {key: value for key, value in cells.items() if key not in known and value}
        samples.append(Sample(cells["index"], question, image, [choices[LETTERS.index(answer)]] if answer else [],
                              choices, answer, cells.get("category") or None, meta))  # fmt: skip
    return samples


# ---- task folders ----


@dataclass(frozen=True)
class OfficialFormat:
    """A public benchmark's converter and how its questions are prompted, parsed and scored."""

    converter: Callable[..., list[Sample]]
    prompt: str
    parser: str
    metric: str
    max_new_tokens: int = 16


FORMATS: dict[str, OfficialFormat] = {
    "vqav2": OfficialFormat(vqav2, SHORT_ANSWER_PROMPT, "vqa", "vqa_accuracy"),
    "gqa": OfficialFormat(gqa, SHORT_ANSWER_PROMPT, "vqa", "exact_match"),
    "textvqa": OfficialFormat(textvqa, SHORT_ANSWER_PROMPT, "vqa", "vqa_accuracy"),
    "docvqa": OfficialFormat(docvqa, SHORT_ANSWER_PROMPT, "raw", "anls", max_new_tokens=32),
    "chartqa": OfficialFormat(chartqa, SHORT_ANSWER_PROMPT, "raw", "relaxed_accuracy"),
    "multiple_choice": OfficialFormat(
        multiple_choice, MULTIPLE_CHOICE_PROMPT, "option_letter", "multiple_choice"
    ),
    "pope": OfficialFormat(pope, SHORT_ANSWER_PROMPT, "yes_no", "pope"),
    "coco_captions": OfficialFormat(coco_captions, "{question}", "caption", "caption", max_new_tokens=64),
}


def _format(kind: str, paths: dict[str, Any]) -> OfficialFormat:
    if kind not in FORMATS:
        raise InputError(f"unknown format {kind!r}: expected one of {', '.join(FORMATS)}")
    official = FORMATS[kind]
    signature = inspect.signature(official.converter)
    try:
        signature.bind(**paths)
    except TypeError:
        expected = ", ".join(signature.parameters)
        raise InputError(
            f"{kind}: expected the arguments {expected}, got {', '.join(paths) or 'none'}"
        ) from None
    return official


def convert(kind: str, out_dir: str | Path, *, name: str | None = None, **paths: Any) -> Path:
    """Convert a public benchmark's files to out_dir/samples.jsonl and out_dir/task.json; return the task file."""
    official = _format(kind, paths)
    samples = official.converter(**paths)
    if not samples:
        raise InputError(f"{kind}: the files {', '.join(str(p) for p in paths.values())} hold no questions")
    out_dir = Path(out_dir)
    write_samples(samples, out_dir / "samples.jsonl")
    task = Task(name or out_dir.name, "samples.jsonl", official.prompt, official.parser, official.metric,
                official.max_new_tokens)  # fmt: skip
    task_path = out_dir / "task.json"
    task_path.write_text(json.dumps(asdict(task), indent=1) + "\n", encoding="utf-8")
    return task_path


def official_task(
    kind: str, *, cache_dir: str | Path = DEFAULT_CACHE_DIR, name: str | None = None, **paths: Any
) -> Task:
    """Return the Task of a benchmark converted into cache_dir/<name>, by default <kind>-<first file's stem>."""
    _format(kind, paths)
    name = name or f"{kind}-{Path(str(next(iter(paths.values())))).stem}"
    return read_task(convert(kind, Path(cache_dir) / name, name=name, **paths))
