"""The contrastive model's side of `mmlm serve`: one model call answers a batch of requests of one kind.

`run_encodings` runs on the engine's model thread; `search_hits` reads the index's metadata on the event loop,
because the index's SQLite connection belongs to the thread that opened it.
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HIT_FIELDS = ("path", "caption", "sha256", "width", "height")  # as mmlm.index.Hit has them


@torch.inference_mode()
def run_encodings(model: Any, index: Any, kind: str, payloads: list[Any]) -> list[Any]:
    """Answer requests of one kind ("embed_text", "embed_image", "classify", "search") with one call per input type.

    Payloads: texts; images; (image, labels); (text | None, image | None, k). Search returns (scores, ids) per
    request, for `search_hits`.
    """
    if kind in ("embed_text", "embed_image"):
        encode = model.encode_text if kind == "embed_text" else model.encode_image
        vectors = encode([item for p in payloads for item in p]).cpu()
        return list(vectors.split([len(p) for p in payloads]))
    if kind == "classify":
        images = model.encode_image([p[0] for p in payloads])
        labels = model.class_embeddings([label for p in payloads for label in p[1]])
        label_groups = labels.split([len(p[1]) for p in payloads])
        return [
            model.logits(images[i : i + 1], g).softmax(-1)[0].tolist() for i, g in enumerate(label_groups)
        ]
    texts = [p[0] for p in payloads if p[0] is not None]
    images = [p[1] for p in payloads if p[1] is not None]
    text_vectors = iter(model.encode_text(texts)) if texts else iter(())
    image_vectors = iter(model.encode_image(images)) if images else iter(())
    queries = []
    for text, image, _ in payloads:  # a text and an image together: their normalised mean
        parts = ([next(text_vectors)] if text is not None else []) + (
            [next(image_vectors)] if image is not None else []
        )
        queries.append(F.normalize(torch.stack(parts).mean(0), dim=-1))
    k = max(p[2] for p in payloads)
    scores, ids = index.search_vectors(torch.stack(queries), k)  # FAISS only: SQLite stays on the loop
    return [(s[: p[2]], i[: p[2]]) for p, s, i in zip(payloads, scores, ids, strict=True)]


def search_hits(index: Any, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
    """Return search rows with their metadata, best first (on the thread that opened the index)."""
    rows = index.metadata.rows(np.unique(ids[ids >= 0]).tolist())
    return [
        {"rank": rank + 1, "score": float(score), "id": int(i), **{f: rows[int(i)][f] for f in HIT_FIELDS}}
        for rank, (score, i) in enumerate(zip(scores, ids, strict=True))
        if i >= 0
    ]
