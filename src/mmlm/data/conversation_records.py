"""A LLaVA conversations file read lazily, record by record, for training streams that must not grow with the data.

JSONL is indexed by the byte offset of each non-blank line (8 bytes a record) and a record is parsed only when
drawn; a JSON list is parsed into records once (text only). Images are never read here: `encode_record` reads a
record's images when a training worker encodes it, and reports a bad record as a skip with its reason rather than
stopping the run (the reasons are SKIP_REASONS).
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmlm.data.conversations import Conversation, encode_conversation, parse_record
from mmlm.errors import InputError
from mmlm.json_files import parse_json, read_text
from mmlm.processing.vlm_processor import EncodedSample, VLMProcessor

# why a drawn sample did not reach a batch
SKIP_REASONS = ("bad_record", "missing_image", "corrupt_image", "placeholders", "too_long")


class SampleSkipped(Exception):
    """A drawn sample that cannot be trained on; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


def line_offsets(path: Path) -> np.ndarray:
    """Return the byte offset of every non-blank line of `path` [N] int64."""
    offsets, position = [], 0
    with path.open("rb") as stream:
        for line in stream:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return np.asarray(offsets, dtype=np.int64)


class ConversationRecords:
    """The records of a LLaVA JSON/JSONL file, each parsed when asked for; images stay on disk."""

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path}: file not found; expected a LLaVA conversations JSON or JSONL file"
            )
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        with self.path.open("rb") as stream:
            head = stream.read(4096).lstrip()
        self.records: list[Any] | None = None  # a JSON list's records; None: JSONL, read by offset
        self.offsets: np.ndarray | None = None
        if head.startswith(b"["):
            self.records = parse_json(read_text(self.path), self.path)
            if not isinstance(self.records, list):
                raise InputError(f"{self.path}: expected a JSON list of records or JSONL")
        else:
            self.offsets = line_offsets(self.path)

    def __len__(self) -> int:
        """Return the number of records."""
        return len(self.records) if self.records is not None else len(self.offsets)

    def where(self, index: int) -> str:
        """Return how errors name record `index`: "file record i" (JSON list) or "file:offset" (JSONL byte)."""
        if self.records is not None:
            return f"{self.path} record {index}"
        return f"{self.path} byte {int(self.offsets[index])}"

    def raw(self, index: int) -> Any:
        """Return record `index` as parsed JSON."""
        if self.records is not None:
            return self.records[index]
        with self.path.open("rb") as stream:
            stream.seek(int(self.offsets[index]))
            line = stream.readline()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.where(index)}: not UTF-8") from None
        return parse_json(text, self.where(index))

    def conversation(self, index: int) -> Conversation:
        """Return record `index` parsed; InputError names the record when it is malformed."""
        return parse_record(self.raw(index), self.where(index), self.image_folder)

    def conversations(self) -> Iterator[Conversation]:
        """Yield every well-formed record in order (malformed ones are left out)."""
        for index in range(len(self)):
            try:
                yield self.conversation(index)
            except InputError:
                continue


def encode_record(
    processor: VLMProcessor, records: ConversationRecords, index: int, frames: int = 8, video_pool: int = 1
) -> EncodedSample:
    """Return record `index` encoded (images read now), or raise SampleSkipped with its reason."""
    try:
        conversation = records.conversation(index)
    except InputError as error:
        reason = "placeholders" if "placeholder" in str(error) else "bad_record"
        raise SampleSkipped(reason, str(error)) from None
    for path in [*conversation.images, *conversation.audio]:
        if not path.is_file():
            raise SampleSkipped("missing_image", f"{path}: file not found")
    try:
        sample = encode_conversation(processor, conversation, frames, video_pool)
    except InputError as error:  # images exist, so what failed is reading one (or a placeholder it expands)
        reason = "placeholders" if "placeholder" in str(error) else "corrupt_image"
        raise SampleSkipped(reason, str(error)) from None
    if sample is None:
        raise SampleSkipped("too_long", f"{records.where(index)}: its tokens do not fit max_length")
    return sample
