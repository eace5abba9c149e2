"""Calibration of zero-shot probabilities: expected calibration error and a fitted temperature.

A contrastive model's zero-shot probabilities are softmax(s · cos), where s = exp(logit_scale) is whatever
the checkpoint learned or was converted with (open_clip and transformers checkpoints bake in different
scales, SigLIP's sigmoid-trained scale is not meant for a softmax). Temperature scaling (Guo et al. 2017)
fits the s that minimises the negative log-likelihood on a calibration split; the report compares it with
the checkpoint's scale and shows the ECE of both on the samples held out from the fit.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Return ECE = Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)| over equal-width confidence bins (Guo et al.)."""
    confidence, pred = probs.max(dim=1)
    correct = (pred == labels.to(pred.device)).double()
    confidence = confidence.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lower) & (confidence <= upper)  # bins are (lower, upper]
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            ece += in_bin.double().mean().item() * gap.item()
    return ece


def nll(cosines: torch.Tensor, labels: torch.Tensor, scale: float) -> float:
    """Return the mean negative log-likelihood of softmax(scale · cosines) at the true labels."""
    return F.cross_entropy(scale * cosines.double(), labels.to(cosines.device)).item()


def fit_scale(cosines: torch.Tensor, labels: torch.Tensor, low: float = 1e-2, high: float = 1e4) -> float:
    """Return the logit scale s minimising the NLL of softmax(s · cosines), found by bisection.

    The NLL is convex in s and its derivative, E_p[cos] − cos_true averaged over samples, is increasing,
    so bisecting on its sign in log space finds the minimum to float64 precision.
    """
    z = cosines.double()
    y = labels.to(z.device)
    true = z.gather(1, y[:, None]).squeeze(1)

    def slope(s: float) -> float:
        p = torch.softmax(s * z, dim=1)
        return ((p * z).sum(1) - true).mean().item()

    if slope(high) <= 0:  # still improving at the top: the data are (nearly) separable
        return high
    if slope(low) >= 0:
        return low
    lo, hi = math.log(low), math.log(high)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def calibration_report(
    cosines: torch.Tensor,
    labels: torch.Tensor,
    checkpoint_scale: float,
    fit_fraction: float = 0.5,
    seed: int = 0,
    low: float = 1e-2,
    high: float = 1e4,
) -> dict[str, Any]:
    """Return ECE and NLL at the checkpoint's scale and at a scale fitted on a random `fit_fraction` split.

    The fitted scale is evaluated on the other samples only, so its figures are honest held-out numbers.
    """
    n = cosines.shape[0]
    labels = labels.to(cosines.device)
    report: dict[str, Any] = {
        "checkpoint_logit_scale": checkpoint_scale,
        "ece": expected_calibration_error(torch.softmax(checkpoint_scale * cosines, 1), labels),
        "nll": nll(cosines, labels, checkpoint_scale),
    }
    n_fit = int(n * fit_fraction)
    if n_fit < 2 or n - n_fit < 2:
        return report  # too few samples to split
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(cosines.device)
    fit, held = order[:n_fit], order[n_fit:]
    fitted = fit_scale(cosines[fit], labels[fit], low, high)
    report.update(
        fitted_logit_scale=fitted,
        fitted_at_bound=fitted in (low, high),  # the fit wants a flatter (or sharper) softmax than allowed
        fitted_temperature=1 / fitted,
        fit_samples=int(n_fit),
        held_out_samples=int(n - n_fit),
        held_out_ece_checkpoint=expected_calibration_error(
            torch.softmax(checkpoint_scale * cosines[held], 1), labels[held]
        ),
        held_out_ece_fitted=expected_calibration_error(
            torch.softmax(fitted * cosines[held], 1), labels[held]
        ),
        held_out_nll_checkpoint=nll(cosines[held], labels[held], checkpoint_scale),
        held_out_nll_fitted=nll(cosines[held], labels[held], fitted),
    )
    return report
