"""Linear probe on frozen features: scikit-learn's logistic regression, its L2 strength chosen on a validation
split, as in CLIP's linear-probe evaluation (Radford et al. 2021, appendix A.3).

The inverse regularisation C is swept over 10^-6 … 10^6 in decades, refined with a finer sweep around the
best decade, then the probe is refitted on train + validation and scored on the test set.
"""

from typing import Any

import numpy as np
import torch

from mmlm.errors import InputError
from mmlm.eval.zeroshot import zero_shot_metrics


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # very weak regularisation converges slowly
        return LogisticRegression(C=c, max_iter=max_iter).fit(features, labels)


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 else None
    return train_test_split(index, test_size=val_fraction, random_state=seed, stratify=stratify)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """Return test top-1/top-5/mean per-class recall of a logistic-regression probe and the chosen C."""
    x, y = train_features.double().cpu().numpy(), train_labels.cpu().numpy()
    if len(np.unique(y)) < 2:
        raise InputError("a linear probe needs training samples of at least two classes")
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    fit_idx, val_idx = _split(y, val_fraction, seed)
    if len(np.unique(y[fit_idx])) < 2:
        raise InputError("the probe's training split holds a single class; give more training samples")

    def val_accuracy(c: float) -> float:
        return float(_fit(x[fit_idx], y[fit_idx], c, max_iter).score(x[val_idx], y[val_idx]))

    sweep = {c: val_accuracy(c) for c in 10.0 ** np.arange(-6, 7)}
    best = max(sweep, key=lambda c: (sweep[c], -c))  # ties go to the stronger regularisation
    for c in best * 10.0 ** np.linspace(-1, 1, 9)[1:-1]:
        if c not in sweep:
            sweep[float(c)] = val_accuracy(float(c))
    best = max(sweep, key=lambda c: (sweep[c], -c))
    probe = _fit(x, y, best, max_iter)
    test_x = test_features.double().cpu().numpy()
    logits = torch.full((len(test_labels), int(max(y.max(), test_labels.max())) + 1), float("-inf"))
    logits[:, probe.classes_] = torch.from_numpy(probe.predict_log_proba(test_x)).float()
    metrics = zero_shot_metrics(logits, test_labels)
    return {
        **metrics,
        "C": best,
        "val_accuracy": sweep[best],
        "sweep": {f"{c:.3g}": acc for c, acc in sorted(sweep.items())},
        "train_samples": len(fit_idx),
        "val_samples": len(val_idx),
        "test_samples": len(test_labels),
    }
