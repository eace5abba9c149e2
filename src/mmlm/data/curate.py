"""Curating image-text pairs with a contrastive model, as DataComp and LAION filter web data.

Two filters, in this order:
1. **Image-text similarity** (the "CLIP score" filter of LAION-400M and DataComp, Gadre et al. 2023, §3.4):
   the cosine between the L2-normalised image and caption embeddings. A pair with several captions scores
   its *best* caption (the maximum), so one good caption keeps the image. Pairs below `min_similarity` are
   dropped, or only the `keep_fraction` most similar are kept (DataComp's "top 30%" baseline). LAION used
   0.28 with OpenAI ViT-B/32 and DataComp 0.28 to 0.3 with ViT-L/14; thresholds depend on the model.
2. **Near-duplicate images** among the pairs the first filter kept: an image whose embedding has cosine at or
   above `dedup_threshold` with an earlier kept image is dropped, so the first occurrence stays. Pairs are
   found with FAISS range search, a chunk of queries at a time, so memory grows with the number of
   near-duplicate pairs, not with N².

The filtered manifest is JSONL with image paths rewritten relative to its own folder and each pair's score
added as "similarity"; the report names every dropped row and why.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mmlm.data.readers import CorruptSample, Pair, PairReader, open_pairs
from mmlm.errors import InputError
from mmlm.processing.image import load_image


@dataclass(frozen=True)
class CurateSettings:
    """Which filters run: a similarity threshold or a kept fraction (not both), and the duplicate threshold."""

    min_similarity: float | None = None
    keep_fraction: float | None = None
    dedup_threshold: float | None = 0.95  # None keeps near-duplicates

    def check(self) -> None:
        """Raise InputError for settings that cannot be applied."""
        if self.min_similarity is not None and self.keep_fraction is not None:
            raise InputError("give --min-similarity or --keep-fraction, not both")
        if self.min_similarity is not None and not -1 <= self.min_similarity <= 1:
            raise InputError(f"--min-similarity is a cosine in [-1, 1], got {self.min_similarity}")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise InputError(f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")
        if self.dedup_threshold is not None and not 0 < self.dedup_threshold <= 1:
            raise InputError(f"--dedup-threshold is a cosine in (0, 1], got {self.dedup_threshold}")


def best_caption_similarity(image_emb: np.ndarray, caption_emb: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Return, per image [N, D], the highest cosine with its captions [C, D]; `owner[c]` is caption c's image."""
    cosines = np.einsum("cd,cd->c", image_emb[owner], caption_emb)
    best = np.full(len(image_emb), -np.inf, np.float32)
    np.maximum.at(best, owner, cosines)
    return best


def keep_top_fraction(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, float | None]:
    """Return a mask keeping the ceil(fraction·N) highest scores (earlier rows win ties) and the lowest kept."""
    keep = np.zeros(len(scores), bool)
    count = math.ceil(fraction * len(scores))
    if count == 0:
        return keep, None
    order = np.argsort(-scores, kind="stable")[:count]
    keep[order] = True
    return keep, float(scores[order[-1]])


def near_duplicates(
    embeddings: np.ndarray, threshold: float, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Return, per row, the earlier kept row it duplicates (−1 if kept) and that cosine (cosine ≥ threshold)."""
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    n = len(embeddings)
    duplicate_of, cosine = np.full(n, -1, np.int64), np.zeros(n, np.float32)
    if n == 0:
        return duplicate_of, cosine
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    radius = threshold - 1e-6  # FAISS keeps inner products strictly above the radius
    for start in range(0, n, chunk):
        limits, scores, ids = index.range_search(embeddings[start : start + chunk], radius)
        for q in range(len(limits) - 1):
            row = start + q
            found, values = ids[limits[q] : limits[q + 1]], scores[limits[q] : limits[q + 1]]
            earlier = np.argsort(found)
            for j in earlier[found[earlier] < row]:
                if duplicate_of[found[j]] == -1:  # rows are decided in order, so found[j] is final
                    duplicate_of[row], cosine[row] = found[j], values[j]
                    break
    return duplicate_of, cosine


def curate(
    model,
    data: str | Path,
    out: str | Path,
    settings: CurateSettings,
    batch_size: int = 32,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the filtered manifest to `out` and a JSON report beside it; return the report."""
    settings.check()
    out = Path(out)
    report_path = Path(report_path) if report_path else out.with_name(out.stem + ".report.json")
    reader = open_pairs(data)
    dropped: list[dict[str, Any]] = []
    pairs, score, emb = embed_pairs(model, reader, batch_size, dropped)
    survivors, threshold = filter_pairs(pairs, score, emb, settings, dropped)

    _write_jsonl(out, [_manifest_row(pairs[i][1], float(score[i]), out.parent) for i in survivors])
    dropped.sort(key=lambda row: row["row"])
    by_reason: dict[str, int] = {}
    for row in dropped:
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    report = {
        "source": str(data),
        "out": str(out),
        "report": str(report_path),
        "settings": asdict(settings),
        "caption_score": "best",  # a pair with several captions scores its most similar caption
        "similarity_threshold": threshold,
        "counts": {
            "rows": len(reader),
            "kept": len(survivors),
            "dropped": len(dropped),
            "dropped_by_reason": by_reason,
        },
        "dropped": dropped,
    }
    _write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report


def embed_pairs(
    model, reader: PairReader, batch_size: int, dropped: list[dict[str, Any]]
) -> tuple[list[tuple[int, Pair]], np.ndarray, np.ndarray]:
    """Return ((row, pair) of each pair with a decodable image, best-caption cosines [N], image embeddings
    [N, D]); rows that cannot be read are appended to `dropped`."""
    pairs: list[tuple[int, Pair]] = []  # (row number, pair) of the pairs with a decodable image
    image_emb, scores = [], []

    def embed(batch: list[tuple[int, Pair, Any]]) -> None:
        images = model.encode_image([image for _, _, image in batch], batch_size).cpu().numpy()
        captions = [c for _, pair, _ in batch for c in pair.captions]
        owner = np.repeat(np.arange(len(batch)), [len(pair.captions) for _, pair, _ in batch])
        texts = model.encode_text(captions).cpu().numpy()
        scores.append(best_caption_similarity(images, texts, owner))
        image_emb.append(images)
        pairs.extend((row, pair) for row, pair, _ in batch)

    batch: list[tuple[int, Pair, Any]] = []
    for i in range(len(reader)):
        try:
            pair = reader.read(i)
        except CorruptSample as error:
            dropped.append({"row": i + 1, "key": error.key, "reason": error.reason, "detail": str(error)})
            continue
        if not isinstance(pair.image, Path):
            raise InputError(
                f"--data: {reader.name} holds image bytes ({pair.key}); curate needs image paths"
            )
        try:
            batch.append((i + 1, pair, load_image(pair.image)))
        except InputError as error:
            dropped.append(_row(i + 1, pair, "unreadable_image", detail=str(error)))
        if len(batch) == batch_size:
            embed(batch)
            batch = []
    if batch:
        embed(batch)
    score = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    emb = np.concatenate(image_emb) if image_emb else np.zeros((0, 1), np.float32)
    return pairs, score, emb


def filter_pairs(
    pairs: list[tuple[int, Pair]],
    score: np.ndarray,
    emb: np.ndarray,
    settings: CurateSettings,
    dropped: list[dict[str, Any]],
) -> tuple[np.ndarray, float | None]:
    """Return (indices of the pairs both filters keep, the similarity threshold applied); the rows they drop
    are appended to `dropped` with their reason."""
    keep, threshold = np.ones(len(pairs), bool), settings.min_similarity
    if settings.keep_fraction is not None:
        keep, threshold = keep_top_fraction(score, settings.keep_fraction)
    elif settings.min_similarity is not None:
        keep = score >= settings.min_similarity
    for i in np.flatnonzero(~keep):
        dropped.append(_row(*pairs[i], "low_similarity", similarity=float(score[i])))
    survivors = np.flatnonzero(keep)
    if settings.dedup_threshold is not None:
        duplicate_of, cosine = near_duplicates(emb[survivors], settings.dedup_threshold)
        for local in np.flatnonzero(duplicate_of >= 0):
            i, first = survivors[local], survivors[duplicate_of[local]]
            original = {
                "row": pairs[first][0],
                "image": str(pairs[first][1].image),
                "cosine": float(cosine[local]),
            }
            dropped.append(
                _row(*pairs[i], "near_duplicate", similarity=float(score[i]), duplicate_of=original)
            )
        survivors = survivors[duplicate_of < 0]
    return survivors, threshold


def _row(row: int, pair: Pair, reason: str, **extra: Any) -> dict[str, Any]:
    return {"row": row, "key": pair.key, "image": str(pair.image), "reason": reason, **extra}


def _manifest_row(pair: Pair, similarity: float, folder: Path) -> dict[str, Any]:
    image = Path(os.path.relpath(Path(pair.image).resolve(), folder.resolve())).as_posix()
    text = pair.captions[0] if len(pair.captions) == 1 else list(pair.captions)
    return {"image": image, "text": text, "similarity": round(similarity, 6)}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        raise InputError(f"{path}: cannot write ({error.strerror or error})") from error
