"""The SQLite half of an image index: one row per image (path, caption, content hash, size, its vector).

SQLite is the index's source of truth. Each batch of images lands in one transaction holding the metadata and
the fp32 embedding, so a build killed at any moment leaves whole batches or nothing. The FAISS file beside it
is a search structure rebuilt from these rows whenever it lags behind (see `mmlm.index.store`).
"""

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    caption TEXT,
    sha256 TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    file_size INTEGER,
    mtime_ns INTEGER,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_path ON images (path);
"""


@dataclass(frozen=True)
class ImageRecord:
    """The metadata of one indexed image; `file_size`/`mtime_ns` let a rebuild skip unchanged files unread."""

    path: str
    sha256: str
    width: int
    height: int
    caption: str | None = None
    file_size: int | None = None
    mtime_ns: int | None = None


class MetadataStore:
    """The `images` and `info` tables of one index, in WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    # info: a JSON value per key
    def get(self, key: str, default: Any = None) -> Any:
        """Return the info value stored under `key`, or `default`."""
        row = self.db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, values: dict[str, Any]) -> None:
        """Store info values, in one transaction."""
        with self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
                [(key, json.dumps(value)) for key, value in values.items()],
            )

    def info(self) -> dict[str, Any]:
        """Return every info value."""
        return {key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM info")}

    # images
    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def has_hash(self, sha256: str) -> bool:
        """Return whether an image with this content hash is indexed."""
        return self.db.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def unchanged(self, path: str, file_size: int, mtime_ns: int) -> bool:
        """Return whether `path` is indexed with this size and modification time."""
        row = self.db.execute(
            "SELECT 1 FROM images WHERE path = ? AND file_size = ? AND mtime_ns = ?",
            (path, file_size, mtime_ns),
        ).fetchone()
        return row is not None

    def insert(self, records: Sequence[ImageRecord], vectors: np.ndarray) -> np.ndarray:
        """Insert one batch in one transaction; return the new row ids. Known hashes must be filtered first."""
        ids = []
        with self._transaction():
            for record, vector in zip(records, vectors, strict=True):
                cursor = self.db.execute(
                    "INSERT INTO images (path, caption, sha256, width, height, file_size, mtime_ns, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.path, record.caption, record.sha256, record.width, record.height,
                        record.file_size, record.mtime_ns, np.asarray(vector, np.float32).tobytes(),
                    ),
                )  # fmt: skip
                ids.append(cursor.lastrowid)
        return np.asarray(ids, np.int64)

    def ids_at_path(self, path: str) -> list[int]:
        """Return the row ids stored under `path`."""
        return [row[0] for row in self.db.execute("SELECT id FROM images WHERE path = ?", (path,))]

    def delete(self, ids: Sequence[int]) -> None:
        """Delete rows, in one transaction."""
        with self._transaction():
            self.db.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in ids])

    def ids(self) -> np.ndarray:
        """Return every row id, ascending."""
        return np.fromiter((row[0] for row in self.db.execute("SELECT id FROM images ORDER BY id")), np.int64)

    def vectors(
        self, ids: np.ndarray | None = None, chunk: int = 50_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids [n], vectors [n, D]) in id order, all rows or the given ids, `chunk` rows at a time."""
        if ids is None:
            query = self.db.execute("SELECT id, vector FROM images ORDER BY id")
            while rows := query.fetchmany(chunk):
                yield _unpack(rows)
            return
        for start in range(0, len(ids), chunk):
            part = [int(i) for i in ids[start : start + chunk]]
            rows = self.db.execute(
                f"SELECT id, vector FROM images WHERE id IN ({','.join('?' * len(part))}) ORDER BY id", part
            ).fetchall()
            yield _unpack(rows)

    def rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Return the metadata of the given row ids, keyed by id."""
        if not len(ids):
            return {}
        part = [int(i) for i in ids]
        query = self.db.execute(
            "SELECT id, path, caption, sha256, width, height FROM images "
            f"WHERE id IN ({','.join('?' * len(part))})",
            part,
        )
        names = ("id", "path", "caption", "sha256", "width", "height")
        return {row[0]: dict(zip(names, row, strict=True)) for row in query}

    def row_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """Return the metadata of the row holding this content hash, or None."""
        row = self.db.execute("SELECT id FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else self.rows([row[0]])[row[0]]

    def _transaction(self) -> "_Transaction":
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, error, trace) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _unpack(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((row[0] for row in rows), np.int64, len(rows))
    vectors = (
        np.stack([np.frombuffer(row[1], np.float32) for row in rows])
        if rows
        else np.empty((0, 0), np.float32)
    )
    return ids, vectors
