"""Zero-shot classification metrics: top-1, top-5 and mean per-class recall (balanced accuracy)."""

import torch


def zero_shot_metrics(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Return {"top1", "top5", "mean_per_class_recall"} for logits [N, K] and integer labels [N]."""
    labels = labels.to(logits.device)
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # [N, k]
    hits = top == labels[:, None]
    out = {f"top{k}": hits[:, : min(k, k_max)].any(1).float().mean().item() for k in ks}
    pred = top[:, 0]
    present = labels.unique()
    recalls = [(pred[labels == c] == c).float().mean() for c in present]
    out["mean_per_class_recall"] = torch.stack(recalls).mean().item()
    return out
