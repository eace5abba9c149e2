"""The samples of a VLM evaluation: a `Sample` per question (its image, audio clip or video, the question, the
reference answers and what scores them), and the samples files that hold them, our JSONL or a TSV with base64
or file images, read with every field checked and written back with media paths relative to the file."""

import csv
import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows

LETTERS = string.ascii_uppercase  # multiple choice option letters, A first
MEDIA = ("image", "audio", "video")


@dataclass
class Sample:
    """One evaluation question: its image (or audio clip, or video), the question, the reference answers and what
    scores them."""

    id: str
    question: str
    image: str | None = None  # a file path (relative: to the data file's folder) or base64 / a data: URL
    answers: list[str] = field(default_factory=list)
    choices: list[str] | None = None  # multiple choice options in order (A, B, C, ...)
    label: str | None = None  # multiple choice: the correct letter; POPE: "yes" | "no"
    type: str | None = None  # question type, for per-type scores
    meta: dict[str, Any] = field(default_factory=dict)
    audio: str | None = (
        None  # an audio file path (relative: to the data file's folder), for a model that hears
    )
    video: str | None = None  # a video file path, sampled to frames by the backend

    @property
    def medium(self) -> str | None:
        """Return what the sample shows the model: "image", "audio", "video", or None (text only)."""
        return next((kind for kind in MEDIA if getattr(self, kind)), None)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON record `read_samples` reads back: id, question and every field not at its default."""
        defaults = Sample("", "")
        return {k: v for k, v in asdict(self).items() if k in ("id", "question") or v != getattr(defaults, k)}


SAMPLE_FIELDS = tuple(f.name for f in fields(Sample))


BASE64_IMAGE_STARTS = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR")  # PNG, JPEG, GIF, WebP signatures in base64


def is_inline_image(image: str) -> bool:
    """Return True when `image` is a data: URL or a base64 string rather than a file path."""
    return image.startswith(("data:", *BASE64_IMAGE_STARTS)) or (
        len(image) > 512 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", image) is not None
    )


def _tsv_list(value: str, column: str, where: str, bars: bool) -> Any:
    if bars and not value.startswith("["):
        return value.split("|")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        kind = 'a JSON list or "|"-separated answers' if bars else "JSON"
        raise InputError(f"{where}: {column}: expected {kind}, got {value[:60]!r}") from None


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line, record): columns id, question, image, answers, choices, label, type, meta; others go to meta."""
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images run past csv's default 128 KiB per field
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file, delimiter="\t")
            header = next(reader, None)
            if header is None:
                return
            missing = [c for c in ("id", "question") if c not in header]
            if missing:
                raise InputError(f"{path}:1: header lacks column(s) {missing}; expected id, question, ...")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise InputError(f"{where}: expected {len(header)} tab-separated cells, got {len(row)}")
                record: dict[str, Any] = {}
                extra: dict[str, Any] = {}
                for column, value in zip(header, row, strict=True):
                    if column in ("answers", "choices", "meta"):
                        if value.strip():
                            record[column] = _tsv_list(value, column, where, bars=column == "answers")
                    elif column in SAMPLE_FIELDS:
                        record[column] = value if value or column in ("id", "question") else None
                    elif value:
                        extra[column] = value
                if extra:
                    meta = record.get("meta", {})
                    record["meta"] = {**meta, **extra} if isinstance(meta, dict) else meta
                yield reader.line_num, record
    finally:
        csv.field_size_limit(previous_limit)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _sample(record: Any, where: str, folder: Path) -> Sample:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with fields {', '.join(SAMPLE_FIELDS)}")
    unknown = sorted(set(record) - set(SAMPLE_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; expected {', '.join(SAMPLE_FIELDS)}")
    record = dict(record)
    if isinstance(record.get("id"), int) and not isinstance(record["id"], bool):
        record["id"] = str(record["id"])
    checks = {
        "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        "question": (lambda v: isinstance(v, str), "a string"),
        "image": (lambda v: v is None or (isinstance(v, str) and v != ""), "a path or base64 string"),
        "answers": (_strings, "a list of strings"),
        "choices": (lambda v: v is None or (_strings(v) and 2 <= len(v) <= 26), "a list of 2 to 26 strings"),
        "label": (lambda v: v is None or isinstance(v, str), "a string"),
        "type": (lambda v: v is None or isinstance(v, str), "a string"),
        "meta": (lambda v: isinstance(v, dict), "an object"),
        "audio": (lambda v: v is None or (isinstance(v, str) and v != ""), "a file path"),
        "video": (lambda v: v is None or (isinstance(v, str) and v != ""), "a file path"),
    }
    defaults = Sample("", "")
    for name, (valid, expected) in checks.items():
        if name in ("id", "question") and name not in record:
            raise InputError(f"{where}: missing field {name!r}")
        value = record.get(name, getattr(defaults, name))
        if not valid(value):
            raise InputError(f"{where}: {name}: expected {expected}, got {value!r:.80}")
    sample = Sample(**record)
    if (
        sample.choices is not None
        and sample.label is not None
        and sample.label not in LETTERS[: len(sample.choices)]
    ):
        raise InputError(
            f"{where}: label: expected a letter A-{LETTERS[len(sample.choices) - 1]}, got {sample.label!r}"
        )
    given = [kind for kind in MEDIA if getattr(sample, kind) is not None]
    if len(given) > 1:
        raise InputError(f"{where}: {' and '.join(given)} given; a sample shows the model one of {MEDIA}")
    for kind in given:
        value = getattr(sample, kind)
        if kind == "image" and is_inline_image(value):
            continue
        setattr(sample, kind, os.path.abspath(os.path.join(folder, value)))
        if not os.path.isfile(getattr(sample, kind)):
            raise InputError(f"{where}: {kind} file {getattr(sample, kind)} not found")
    return sample


def read_samples(path: str | Path, limit: int | None = None) -> list[Sample]:
    """Return the first `limit` samples of a JSONL or TSV file, image paths resolved against its folder."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise InputError(f"limit: expected a positive number of samples, got {limit}")
    if not path.is_file():
        raise InputError(f"{path}: samples file not found")
    readers = {".jsonl": jsonl_rows, ".tsv": _tsv_rows}
    if path.suffix.lower() not in readers:
        raise InputError(f"{path}: expected a samples file ending in .jsonl or .tsv")
    samples: list[Sample] = []
    lines: dict[str, int] = {}
    # closing: a TSV reader stopped early by `limit` restores csv's field size limit at once
    with closing(readers[path.suffix.lower()](path)) as rows:
        for line, record in rows:
            sample = _sample(record, f"{path}:{line}", path.parent)
            if sample.id in lines:
                raise InputError(f"{path}:{line}: id {sample.id!r} repeats line {lines[sample.id]}")
            lines[sample.id] = line
            samples.append(sample)
            if len(samples) == limit:
                break
    if not samples:
        raise InputError(f"{path}: no samples")
    return samples


def write_samples(samples: Sequence[Sample], path: Path) -> Path:
    """Write samples as JSONL (image files under its folder stored relative to it); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    lines = []
    for sample in samples:
        record = sample.to_dict()
        for kind in MEDIA:
            value = getattr(sample, kind)
            local = value is not None and not is_inline_image(value) and os.path.isabs(value)
            # media files inside the file's folder are stored relative to it, so the folder can move
            if local and os.path.commonpath([folder, os.path.abspath(value)]) == folder:
                record[kind] = Path(os.path.relpath(value, folder)).as_posix()
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.replace(path)  # a reader never sees half a file
    return path
