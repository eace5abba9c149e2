"""`ImageIndex`: an index folder holding `index.sqlite` (metadata + vectors) and `vectors.faiss` (search).

Crash safety rests on one order of writes. A batch is committed to SQLite first, in one transaction; the
FAISS file is rewritten later (every so often, and when a build ends) through a temporary file and an atomic
rename. So the FAISS file only ever holds rows SQLite already has, and opening an index reconciles the two:
rows SQLite has and FAISS lacks are added from their stored vectors, and ids SQLite no longer has (an image
replaced after the last save) are removed from FAISS.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from mmlm.errors import InputError
from mmlm.index.metadata import SCHEMA_VERSION, ImageRecord, MetadataStore
from mmlm.index.vectors import (
    AnnSettings,
    flat_index,
    index_kind,
    load_index,
    save_index,
    set_nprobe,
    stored_ids,
    train_ivf,
    tune_nprobe,
)

DATABASE = "index.sqlite"
VECTORS = "vectors.faiss"
PROBE_TEXT = "a photo."  # its embedding fingerprints the model that built an index
PROBE_MIN_COSINE = 0.99  # bf16 against fp32 weights stays well above this; another model does not


@dataclass(frozen=True)
class Hit:
    """One search result: rank (1-based), cosine score, row id and the image's metadata."""

    rank: int
    score: float
    id: int
    path: str
    caption: str | None
    sha256: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        """Return the hit as a JSON-ready dict."""
        return asdict(self)


def model_fingerprint(model, model_path: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Return what an index records about the model that embeds into it: path (a folder, or a hub id and its
    revision), family, dim, probe vector."""
    probe = model.encode_text([PROBE_TEXT])[0].cpu()
    folder = Path(model_path)
    return {
        "model_path": str(folder.resolve()) if folder.is_dir() else str(model_path),
        **({"model_revision": revision} if revision is not None else {}),
        "model_family": model.config.family,
        "dim": int(probe.shape[0]),
        "model_probe": [round(float(v), 6) for v in probe],
    }


class ImageIndex:
    """Image embeddings searchable by cosine similarity, with each image's path, caption, hash and size."""

    def __init__(self, folder: Path, metadata: MetadataStore, vectors: faiss.Index) -> None:
        self.folder, self.metadata, self.vectors = folder, metadata, vectors
        self.dim = int(metadata.get("dim"))

    # opening and creating
    @classmethod
    def create(cls, folder: str | Path, dim: int, model_info: dict[str, Any] | None = None) -> "ImageIndex":
        """Return a new empty index in `folder` (created if needed) for `dim`-dimensional embeddings."""
        folder = Path(folder)
        if (folder / DATABASE).exists():
            raise InputError(f"--index: {folder} already holds an index; open it instead")
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--index: {folder} is a file; expected a folder")
        folder.mkdir(parents=True, exist_ok=True)
        metadata = MetadataStore(folder / DATABASE)
        metadata.put({"schema_version": SCHEMA_VERSION, "dim": dim, "kind": "flat", **(model_info or {})})
        return cls(folder, metadata, flat_index(dim))

    @classmethod
    def open(cls, folder: str | Path) -> "ImageIndex":
        """Return the index stored in `folder`, with FAISS brought level with SQLite."""
        folder = Path(folder)
        if not (folder / DATABASE).is_file():
            raise InputError(f"--index: {folder} is not an mmlm index (no {DATABASE} in it)")
        metadata = MetadataStore(folder / DATABASE)
        if metadata.get("dim") is None:
            metadata.close()
            raise InputError(f"--index: {folder / DATABASE} has no 'dim'; expected an index written by mmlm")
        dim = int(metadata.get("dim"))
        path = folder / VECTORS
        vectors = load_index(path) if path.is_file() else flat_index(dim)
        index = cls(folder, metadata, vectors)
        index._reconcile()
        return index

    @classmethod
    def open_or_create(cls, folder: str | Path, model_info: dict[str, Any]) -> "ImageIndex":
        """Return the index in `folder`, creating it for this model if there is none."""
        if (Path(folder) / DATABASE).is_file():
            return cls.open(folder)
        return cls.create(folder, model_info["dim"], model_info)

    def _reconcile(self) -> None:
        in_faiss, in_sqlite = stored_ids(self.vectors), self.metadata.ids()
        if self.vectors.d != self.dim:
            self.vectors = flat_index(self.dim)  # rebuilt; the next finalize() re-trains IVF if large enough
            self.metadata.put({"kind": "flat"})
            in_faiss = in_faiss[:0]
        if len(deleted := np.setdiff1d(in_faiss, in_sqlite)):  # rows removed after the last save
            self.vectors.remove_ids(faiss.IDSelectorBatch(deleted))
        missing = np.setdiff1d(in_sqlite, in_faiss)
        for ids, vectors in self.metadata.vectors(missing):
            self.vectors.add_with_ids(vectors, ids)
        if index_kind(self.vectors) == "ivf" and (nprobe := self.metadata.get("nprobe")):
            set_nprobe(self.vectors, int(nprobe))

    def close(self) -> None:
        """Close the database (unsaved FAISS additions are recovered from SQLite on the next open)."""
        self.metadata.close()

    def __enter__(self) -> "ImageIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # contents
    def __len__(self) -> int:
        return len(self.metadata)

    @property
    def info(self) -> dict[str, Any]:
        """Return what the index records about itself: dim, kind, model, IVF settings and recall check."""
        info = self.metadata.info()
        info.pop("model_probe", None)
        return {**info, "images": len(self), "in_faiss": int(self.vectors.ntotal)}

    def check_model(self, model) -> None:
        """Raise InputError unless `model` embeds into the same space as the model that built this index."""
        built_by = self.metadata.get("model_path") or "an unrecorded model"
        probe = model.encode_text([PROBE_TEXT])[0].cpu().float()
        if probe.shape[0] != self.dim:
            raise InputError(
                f"--model: gives {probe.shape[0]}-dim embeddings, but the index {self.folder} holds "
                f"{self.dim}-dim ones (built by {built_by})"
            )
        stored = self.metadata.get("model_probe")
        if stored is not None and float(probe @ torch.tensor(stored)) < PROBE_MIN_COSINE:
            raise InputError(
                f"--model: embeds differently from the model that built the index {self.folder} ({built_by})"
            )

    # writing
    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """Add a batch (one SQLite transaction, then FAISS in memory); return the new row ids."""
        vectors = self._as_queries(vectors, "vectors")
        if len(records) != len(vectors):
            raise InputError(f"add: {len(records)} records but {len(vectors)} vectors")
        ids = self.metadata.insert(records, vectors)
        self.vectors.add_with_ids(vectors, ids)
        return ids

    def remove(self, ids: Sequence[int]) -> None:
        """Remove rows from SQLite (one transaction), then from FAISS in memory."""
        if len(ids):
            self.metadata.delete(ids)
            self.vectors.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))

    def has_hash(self, sha256: str) -> bool:
        """Return whether an image with this content hash is indexed."""
        return self.metadata.has_hash(sha256)

    def save(self) -> None:
        """Write the FAISS file atomically."""
        save_index(self.vectors, self.folder / VECTORS)

    def finalize(self, ann: AnnSettings | None = None) -> dict[str, Any]:
        """Switch to IVF at the size threshold (re-train when the index doubled), re-check recall, and save."""
        ann = ann or AnnSettings()
        n, kind = len(self), index_kind(self.vectors)
        report: dict[str, Any] = {"kind": kind}
        trained_on = self.metadata.get("trained_on") or 0
        if n >= ann.threshold and (kind == "flat" or n >= 2 * trained_on):
            ids, vectors = self._all_vectors()
            self.vectors, report = train_ivf(vectors, ids, ann)
        elif kind == "ivf" and n != self.metadata.get("checked_at"):
            ids, vectors = self._all_vectors()
            report = {**tune_nprobe(self.vectors, vectors, ids, ann), "trained_on": trained_on}
        elif kind == "ivf":
            report = {name: self.metadata.get(name) for name in _IVF_REPORT}
        if report.get("kind") == "ivf":
            self.metadata.put({**report, "checked_at": n, "ann_threshold": ann.threshold})
        else:
            self.metadata.put({"kind": "flat", "ann_threshold": ann.threshold})
        self.save()
        return report

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.metadata.vectors())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # searching
    def search_vectors(
        self, queries: np.ndarray | torch.Tensor, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores [Q, k], ids [Q, k]) for L2-normalised queries [Q, D]; id −1 pads when k > len."""
        if k < 1:
            raise InputError(f"-k: must be at least 1, got {k}")
        return self.vectors.search(self._as_queries(queries, "query"), k)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """Return the top-k hits for each query embedding [Q, D] (or [D]), best first, with metadata."""
        scores, ids = self.search_vectors(queries, k)
        rows = self.metadata.rows(np.unique(ids[ids >= 0]).tolist())
        return [
            [
                Hit(rank + 1, float(score), int(i), **{key: rows[int(i)][key] for key in _ROW_FIELDS})
                for rank, (score, i) in enumerate(zip(s, row_ids, strict=True))
                if i >= 0
            ]
            for s, row_ids in zip(scores, ids, strict=True)
        ]

    def _as_queries(self, queries: np.ndarray | torch.Tensor, field: str) -> np.ndarray:
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        queries = np.asarray(queries, np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(
                f"{field}: expected embeddings of shape [N, {self.dim}] for the index {self.folder}, "
                f"got {list(queries.shape)}"
            )
        return np.ascontiguousarray(queries)


_IVF_REPORT = ("kind", "nlist", "nprobe", "recall_at_10", "recall_queries", "target_recall", "trained_on")
_ROW_FIELDS = ("path", "caption", "sha256", "width", "height")
