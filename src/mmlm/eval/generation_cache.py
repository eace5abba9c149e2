"""A SQLite cache of generations, so an interrupted evaluation resumes and a re-score generates nothing.

A generation is keyed by the sha256 of everything that decides it: the model, the task, the sample, the full
prompt (OCR text included), the probe, the digest of the image the model saw, and the decoding settings.
Change any of them and the key changes. The file is in WAL mode and each batch is written in one
transaction, so a run killed mid-batch loses at most that batch. OCR text is cached by image digest too.
"""

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mmlm.errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT, task TEXT, sample_id TEXT, probe TEXT, created REAL
);
CREATE TABLE IF NOT EXISTS ocr (image_digest TEXT PRIMARY KEY, text TEXT NOT NULL);
"""


def image_digest(image: Image.Image) -> str:
    """Return the sha256 of an image's mode, size and pixels."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def generation_key(
    model: str,
    task: str,
    sample_id: str,
    prompt: str,
    probe: str,
    image_digests: Sequence[str],
    decoding: Mapping[str, Any],
) -> str:
    """Return the sha256 hex key of one generation."""
    parts = {"model": model, "task": task, "sample_id": sample_id, "prompt": prompt, "probe": probe,
             "images": list(image_digests), "decoding": dict(decoding)}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class GenerationCache:
    """Generations and OCR texts in one SQLite file; `get_many` and `put_many` work a batch at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"--cache {self.path}: is a folder; expected a SQLite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise InputError(f"--cache {self.path}: not a usable SQLite file ({error})") from error

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """Return the cached text of each key that has one."""
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(f"SELECT key, text FROM generations WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def put_many(self, rows: Iterable[tuple[str, str, str, str, str, str]]) -> None:
        """Store (key, text, model, task, sample_id, probe) rows in one transaction."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in rows],
            )

    def get_ocr(self, digest: str) -> str | None:
        """Return the OCR text cached for an image digest, or None."""
        row = self.db.execute("SELECT text FROM ocr WHERE image_digest = ?", (digest,)).fetchone()
        return None if row is None else row[0]

    def put_ocr(self, digest: str, text: str) -> None:
        """Store the OCR text of an image digest."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO ocr VALUES (?, ?)", (digest, text))

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> "GenerationCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
