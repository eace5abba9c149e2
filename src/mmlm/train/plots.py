"""PNG plots of a training run: loss, learning rate, and the evaluation curves."""

from itertools import pairwise
from pathlib import Path
from typing import Any


def plot_training(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write loss.png, lr.png and eval.png (if any evaluation ran) into `out`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    written = []
    for key, name, label in (("loss", "loss.png", "training loss"), ("lr", "lr.png", "learning rate")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, [r[key] for r in records])
        ax.set(xlabel="step", ylabel=label, title=label)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    keys = [
        k
        for k in ("zero_shot_top1", "image_to_text_R@1", "text_to_image_R@1")
        if any(k in r for r in records)
    ]
    if keys:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in keys:
            evals = [r for r in records if key in r]
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        ax.set(xlabel="step", ylabel="score", ylim=(0, 1), title="evaluation")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=110)
        plt.close(fig)
        written.append(out / "eval.png")
    return written


def plot_modality_losses(records: list[dict[str, Any]], out: Path) -> Path:
    """Write loss_modality.png: the training loss on image, audio and text-only samples; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("loss_image", "loss_audio", "loss_text"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=key)
    for boundary in {r["step"] for r, nxt in pairwise(records) if r["stage"] != nxt["stage"]}:
        ax.axvline(boundary, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="step", ylabel="loss", title="loss per modality (dotted: stage ends)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_modality.png", dpi=110)
    plt.close(fig)
    return out / "loss_modality.png"
