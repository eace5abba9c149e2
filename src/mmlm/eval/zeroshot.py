"""Zero-shot classification: template-ensembled class embeddings, then top-1, top-5 and mean per-class recall.

The metrics are CLIP_benchmark's: top-k counts a sample when its class is among the k highest logits
(`torch.topk` order on ties), and mean per-class recall is scikit-learn's balanced accuracy (the mean recall
over the classes present in the labels) of the argmax prediction. With fewer than k classes, top-k is reported as None
(CLIP_benchmark reports NaN).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmlm.data.classification import LabelledImages
from mmlm.eval.calibration import calibration_report


def zero_shot_metrics(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float | None]:
    """Return {"top1", "top5", "mean_per_class_recall"} for logits [N, K] and integer labels [N]."""
    labels = labels.to(logits.device)
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # [N, k]
    hits = top == labels[:, None]
    out: dict[str, float | None] = {
        f"top{k}": hits[:, :k].any(1).float().mean().item() if k <= k_max else None for k in ks
    }
    pred = logits.argmax(dim=1)  # CLIP_benchmark's prediction; on ties it may differ from topk's first
    recalls = [(pred[labels == c] == c).float().mean() for c in labels.unique()]
    out["mean_per_class_recall"] = torch.stack(recalls).mean().item()
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return counts [K, K] where entry (i, j) counts samples of class i predicted as class j."""
    flat = labels.long() * num_classes + pred.long().to(labels.device)
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Write a confusion-matrix PNG (rows: true class, normalised to recall) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    rates = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    side = min(3 + 0.28 * k, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=max(5, 10 - k // 10))
    ax.set_yticks(range(k), class_names, fontsize=max(5, 10 - k // 10))
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (row-normalised)")
    if k <= 12:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prompt_name(label: str) -> str:
    """Return a class label as it reads in a prompt: folder-style underscores become spaces."""
    return label.replace("_", " ")


def zero_shot_cosines(
    model, data: LabelledImages, templates: Sequence[str], batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """Return cosine similarities [N, K] between the images and the template-ensembled class embeddings."""
    classes = model.class_embeddings([prompt_name(c) for c in data.class_names], templates)
    images = model.encode_image(data.images, batch_size, progress=progress)
    return images @ classes.T


def evaluate_zero_shot(
    model,
    data: LabelledImages,
    templates: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    confusion_png: Path | None = None,
    max_plot_classes: int = 50,
) -> dict[str, Any]:
    """Return zero-shot metrics, calibration figures and per-class recall; optionally write the confusion PNG."""

    cosines = zero_shot_cosines(model, data, templates, batch_size, progress)
    labels = torch.tensor(data.labels)
    scale = model.model.logit_scale.exp().item()
    metrics = zero_shot_metrics(cosines, labels)
    k = len(data.class_names)
    matrix = confusion_matrix(cosines.argmax(1), labels, k)
    per_class = {
        name: (matrix[i, i] / matrix[i].sum()).item()
        for i, name in enumerate(data.class_names)
        if matrix[i].sum()
    }
    result: dict[str, Any] = {
        **metrics,
        "num_samples": len(data.images),
        "num_classes": k,
        "num_templates": len(templates),
        "per_class_recall": per_class,
        "calibration": calibration_report(cosines, labels, scale),
    }
    if confusion_png is not None and k <= max_plot_classes:
        result["confusion_png"] = str(plot_confusion(matrix, data.class_names, confusion_png))
    return result
