"""The contrastive losses against the chapter's worked example and their defining formulas."""

import math

import pytest
import torch

from mmlm.train.losses import clip_loss, siglip_loss

# The chapter's 4x4 example (tau = 1): the diagonal is the highest entry of each row; row 1 is (0.9, 0.1, 0.2, 0.0).
S = torch.tensor(
    [[0.9, 0.1, 0.2, 0.0], [0.1, 0.8, 0.0, 0.1], [0.2, 0.1, 0.7, 0.0], [0.0, 0.2, 0.1, 0.6]],
    dtype=torch.float64,
)


def test_worked_example_row_one_exact_values():
    p = torch.softmax(S[0], 0)[0].item()
    assert p == pytest.approx(0.4251, abs=5e-5)  # the chapter rounds this to 0.42
    assert -math.log(p) == pytest.approx(0.8555, abs=5e-5)  # and so prints 0.87


def test_clip_loss_is_mean_of_row_and_column_cross_entropies():
    # image_emb @ I = S and exp(0) = 1/tau = 1, so the loss sees exactly the example's logits
    loss = clip_loss(S, torch.eye(4, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    rows = [-torch.log_softmax(S[i], 0)[i] for i in range(4)]
    cols = [-torch.log_softmax(S[:, j], 0)[j] for j in range(4)]
    assert loss.item() == pytest.approx((sum(rows) / 4 + sum(cols) / 4).item() / 2, abs=1e-12)
    assert rows[0].item() == pytest.approx(0.8555, abs=5e-5)


def test_clip_loss_temperature_sharpens():
    x = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1)
    hot, cold = clip_loss(x, x, torch.tensor(0.0)), clip_loss(x, x, torch.tensor(math.log(100)))
    assert cold < hot  # matched pairs on the diagonal: a larger scale is more confident


def test_siglip_loss_matches_pairwise_definition():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    t, b = torch.tensor(math.log(10), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            expected -= math.log(1 / (1 + math.exp(-z * (10 * (x[i] @ y[j]).item() - 10))))
    assert siglip_loss(x, y, t, b).item() == pytest.approx(expected / 5, rel=1e-10)
