"""Image-text (and audio-text) retrieval metrics as CLIP_benchmark defines them, computed in chunks for bounded
memory.

Recall@K: a query scores 1 if at least one of its positives is among its top-K targets, ties broken in
`torch.topk` order (CLIP_benchmark's `recall_at_k(...) > 0`). A query's rank is that of its best-ranked
positive, 1 + the number of targets scored strictly higher (ties count in the query's favour). The mean and
median ranks follow open_clip: mean of the ranks, and floor(median(rank − 1)) + 1.
"""

from collections.abc import Sequence

import numpy as np
import torch

from mmlm.data.audio_pairs import is_audio_manifest, read_audio_manifest
from mmlm.data.readers import open_pairs
from mmlm.errors import InputError
from mmlm.processing.image import load_image

SCORE_BUDGET = 1 << 26  # scores held at once (256 MB in fp32): 100k × 500k runs in ~750 chunks


def _direction(
    queries: torch.Tensor, targets: torch.Tensor, positives: list[list[int]], ks: Sequence[int], chunk: int
) -> tuple[dict[int, float], np.ndarray]:
    """Return recall@k for each k and every query's rank, for `positives[i]` the targets query i matches."""
    hits = dict.fromkeys(ks, 0)
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ targets.T  # [C, T]
        rows = positives[start : start + chunk]
        row_ids = torch.tensor([r for r, pos in enumerate(rows) for _ in pos], device=scores.device)
        col_ids = torch.tensor([t for pos in rows for t in pos], device=scores.device)
        is_positive = torch.zeros_like(scores, dtype=torch.bool)
        is_positive[row_ids, col_ids] = True
        for k in ks:
            # one topk per k, as CLIP_benchmark does: topk(5)[:1] may order ties unlike topk(1)
            top = scores.topk(min(k, targets.shape[0]), dim=1).indices  # [C, k]
            hits[k] += int(is_positive.gather(1, top).any(dim=1).sum())
        best = scores.masked_fill(~is_positive, float("-inf")).amax(dim=1, keepdim=True)  # [C, 1]
        ranks.append(((scores > best).sum(dim=1) + 1).cpu().numpy())
    n = queries.shape[0]
    return {k: hits[k] / n for k in ks}, np.concatenate(ranks)


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk: int | None = None,
    modality: str = "image",
) -> dict[str, float]:
    """Return open_clip-named recall@K and mean/median ranks, image→text and text→image.

    `text_to_image[j]` is the index of the image that text j describes; an image may have several texts.
    `chunk` queries are scored at a time (by default as many as fit SCORE_BUDGET scores). With
    `modality="audio"` the first embeddings are clips' and the names read audio_to_text_R@1, text_to_audio_R@1.
    """
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    if len(text_to_image) != n_texts:
        raise InputError(f"text_to_image has {len(text_to_image)} entries for {n_texts} texts")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise InputError(
            f"image embeddings have {image_emb.shape[1]} dims, text embeddings {text_emb.shape[1]}"
        )
    captions_of: list[list[int]] = [[] for _ in range(n_images)]
    for j, i in enumerate(text_to_image):
        if not 0 <= i < n_images:
            raise InputError(f"text {j} points at image {i}, but there are {n_images} images")
        captions_of[i].append(j)
    if not all(captions_of):
        raise InputError(f"image {next(i for i, c in enumerate(captions_of) if not c)} has no caption")
    out: dict[str, float] = {}
    for name, q, t, pos in (
        (f"{modality}_to_text", image_emb, text_emb, captions_of),
        (f"text_to_{modality}", text_emb, image_emb, [[i] for i in text_to_image]),
    ):
        rows = chunk or max(1, SCORE_BUDGET // t.shape[0])
        recall, ranks = _direction(q, t, pos, ks, rows)
        out.update({f"{name}_R@{k}": v for k, v in recall.items()})
        out[f"{name}_mean_rank"] = float(ranks.mean())
        out[f"{name}_median_rank"] = float(np.floor(np.median(ranks - 1)) + 1)
    return out


def read_retrieval_set(source: str, limit: int | None = None, **options) -> tuple[list, list[str], list[int]]:
    """Return (images, texts, text_to_image) of an image-text dataset; unusable images are left out."""

    images, texts, text_to_image = [], [], []
    for pair in open_pairs(source, **options):
        if limit is not None and len(images) == limit:
            break
        try:
            load_image(pair.image)  # corrupt samples are left out of evaluation, as out of training
        except InputError:
            continue
        text_to_image += [len(images)] * len(pair.captions)
        texts += list(pair.captions)
        images.append(pair.image)
    if not images:
        raise InputError(f"{source}: no usable image-text pairs")
    return images, texts, text_to_image


def read_audio_retrieval_set(
    source: str, limit: int | None = None, split: str | None = None
) -> tuple[list, list[str], list[int]]:
    """Return (clip paths, texts, text_to_clip) of a JSONL audio manifest ({"audio", "text"} rows)."""

    clips, captions = read_audio_manifest(source, split)
    clips, captions = clips[:limit], captions[:limit]
    texts = [t for caps in captions for t in caps]
    text_to_clip = [i for i, caps in enumerate(captions) for _ in caps]
    return clips, texts, text_to_clip


def read_any_retrieval_set(
    source: str, limit: int | None = None, **options
) -> tuple[str, list, list[str], list[int]]:
    """Return (modality, inputs, texts, text_to_input): an audio manifest's clips, or any image-text dataset's images."""

    if is_audio_manifest(source):
        return "audio", *read_audio_retrieval_set(source, limit, options.get("split"))
    return "image", *read_retrieval_set(source, limit, **options)


def manifest_evaluator(source: str, limit: int = 1000, **options):
    """Return evaluate(model, step) computing retrieval metrics on the first `limit` usable pairs of a dataset."""
    modality, inputs, texts, text_to_input = read_any_retrieval_set(source, limit, **options)

    def evaluate(model, step: int) -> dict[str, float]:
        model.model.eval()
        return retrieval_metrics(
            model.encode_inputs(inputs), model.encode_text(texts), text_to_input, modality=modality
        )

    return evaluate
