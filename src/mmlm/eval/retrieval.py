"""Image-text retrieval metrics as CLIP_benchmark defines them, computed in chunks for bounded memory.

A query scores 1 at K if at least one of its positives is among its top-K targets (ties broken in
torch.topk order). A query's rank is that of its best-ranked positive, counting targets scored strictly higher.
"""

import torch


def _direction(queries: torch.Tensor, targets: torch.Tensor, positives: list[list[int]], ks, chunk: int):
    hits = {k: 0 for k in ks}
    ranks = []
    k_max = min(max(ks), targets.shape[0])
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ targets.T  # [chunk, T]
        top = scores.topk(k_max, dim=1).indices
        for row, pos in enumerate(positives[start : start + chunk]):
            pos_t = torch.tensor(pos, device=scores.device)
            found = torch.isin(top[row], pos_t)
            for k in ks:
                hits[k] += bool(found[:k].any())
            best = scores[row, pos_t].max()
            ranks.append(int((scores[row] > best).sum()) + 1)
    n = queries.shape[0]
    rank_t = torch.tensor(ranks, dtype=torch.float64)
    return {k: hits[k] / n for k in ks}, rank_t.mean().item(), rank_t.median().item()


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: list[int],
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Return open_clip-named recall@K and mean/median ranks both ways.

    `text_to_image[j]` is the index of the image that text j describes; an image may have several texts.
    """
    captions_of: list[list[int]] = [[] for _ in range(image_emb.shape[0])]
    for j, i in enumerate(text_to_image):
        captions_of[i].append(j)
    out: dict[str, float] = {}
    for name, q, t, pos in (
        ("image_to_text", image_emb, text_emb, captions_of),
        ("text_to_image", text_emb, image_emb, [[i] for i in text_to_image]),
    ):
        recall, mean_rank, median_rank = _direction(q, t, pos, ks, chunk)
        out.update({f"{name}_R@{k}": v for k, v in recall.items()})
        out[f"{name}_mean_rank"], out[f"{name}_median_rank"] = mean_rank, median_rank
    return out


def manifest_evaluator(source: str, limit: int = 1000, **options):
    """Return evaluate(model, step) computing retrieval metrics on the first `limit` usable pairs of a dataset."""
    from mmlm.data.readers import open_pairs
    from mmlm.errors import InputError
    from mmlm.processing.image import load_image

    images, texts, text_to_image = [], [], []
    for pair in open_pairs(source, **options):
        if len(images) == limit:
            break
        try:
            load_image(pair.image)  # corrupt samples are left out of evaluation, as out of training
        except InputError:
            continue
        text_to_image += [len(images)] * len(pair.captions)
        texts += list(pair.captions)
        images.append(pair.image)

    def evaluate(model, step: int) -> dict[str, float]:
        model.model.eval()
        return retrieval_metrics(model.encode_image(images), model.encode_text(texts), text_to_image)

    return evaluate
