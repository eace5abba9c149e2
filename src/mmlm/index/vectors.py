"""The FAISS half of an image index: exact inner-product search for small collections, IVF above a threshold.

Embeddings are L2-normalised, so inner product is cosine similarity. Both kinds store the SQLite row ids, so
FAISS returns them directly and the ids it holds can be listed to reconcile the two halves: the exact index
inside an `IndexIDMap2`, the IVF index natively (an `IndexIDMap` over IVF would go wrong after `remove_ids`,
because IVF does not renumber its internal ids the way the map assumes).

IVF (Jégou et al., "Product quantization for nearest neighbor search", 2011, the inverted file without the
quantisation): k-means splits the vectors into `nlist` cells; a query scans only its `nprobe` nearest cells.
`tune_nprobe` picks the smallest power-of-two `nprobe` whose recall@10 against exact search, on a sample of
stored vectors used as queries, reaches the target. Stored vectors are an optimistic stand-in for real
queries (each one's own cell is always probed), so the recorded recall is an estimate.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np


@dataclass(frozen=True)
class AnnSettings:
    """When and how an index switches from exact search to IVF."""

    threshold: int = 50_000  # vectors at or above which the index becomes IVF
    nlist: int | None = None  # IVF cells; None picks about 4·√n
    target_recall: float = 0.95  # recall@10 that nprobe is tuned to reach
    sample_queries: int = 500  # stored vectors used as queries in the recall check
    train_per_cell: int = 64  # k-means training vectors per cell (FAISS warns below 39)
    seed: int = 0


def flat_index(dim: int) -> faiss.Index:
    """Return an empty exact inner-product index that keeps caller-given ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def index_kind(index: faiss.Index) -> str:
    """Return "flat" or "ivf"."""
    return "ivf" if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else "flat"


def stored_ids(index: faiss.Index) -> np.ndarray:
    """Return the ids an index holds."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexIVF):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = index.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(cell), lists.list_size(cell)).astype(np.int64)
        for cell in range(index.nlist)
        if lists.list_size(cell)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def choose_nlist(n: int) -> int:
    """Return about 4·√n cells, at least 1 and at most n // 39 so k-means has enough points per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def train_ivf(
    vectors: np.ndarray, ids: np.ndarray, settings: AnnSettings
) -> tuple[faiss.Index, dict[str, Any]]:
    """Return an IVF index holding `vectors` under `ids`, with nprobe tuned, and its recall report."""
    n, dim = vectors.shape
    nlist = settings.nlist or choose_nlist(n)
    rng = np.random.default_rng(settings.seed)
    train = vectors[rng.choice(n, min(n, settings.train_per_cell * nlist), replace=False)]
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = settings.seed
    ivf.train(np.ascontiguousarray(train))
    ivf.add_with_ids(np.ascontiguousarray(vectors), ids)  # faiss's Python wrapper keeps the quantizer alive
    report = tune_nprobe(ivf, vectors, ids, settings)
    return ivf, {**report, "trained_on": n}


def tune_nprobe(
    index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, settings: AnnSettings, k: int = 10
) -> dict[str, Any]:
    """Set the smallest power-of-two nprobe reaching the target recall@k; return the report of that check."""
    ivf = faiss.extract_index_ivf(index)
    rng = np.random.default_rng(settings.seed + 1)
    picks = rng.choice(len(vectors), min(len(vectors), settings.sample_queries), replace=False)
    queries = np.ascontiguousarray(vectors[picks])
    _, positions = faiss.knn(queries, np.ascontiguousarray(vectors), k, faiss.METRIC_INNER_PRODUCT)
    exact = ids[positions]
    nprobe, recall = 1, 0.0
    while True:
        ivf.nprobe = nprobe
        recall = recall_at_k(index.search(queries, k)[1], exact)
        if recall >= settings.target_recall or nprobe >= ivf.nlist:
            break
        nprobe = min(2 * nprobe, ivf.nlist)
    return {
        "kind": "ivf",
        "nlist": int(ivf.nlist),
        "nprobe": int(nprobe),
        "recall_at_10" if k == 10 else f"recall_at_{k}": float(recall),
        "recall_queries": len(picks),
        "target_recall": settings.target_recall,
    }


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Return mean |approx ∩ exact| / k over the rows of two [Q, k] id arrays (−1 marks a missing hit)."""
    k = exact.shape[1]
    found = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(found) / k) if found else 0.0


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set how many IVF cells a query scans."""
    faiss.extract_index_ivf(index).nprobe = nprobe


def save_index(index: faiss.Index, path: Path) -> None:
    """Write the index to `path` through a temporary file and an atomic rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(temporary))
    with open(temporary, "rb") as written:
        os.fsync(written.fileno())
    os.replace(temporary, path)


def load_index(path: Path) -> faiss.Index:
    """Read an index written by `save_index`."""
    return faiss.read_index(str(path))
