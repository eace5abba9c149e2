"""Gradient accumulation with full-batch negatives equals one step on the whole batch (float64, tiny towers)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig
from mmlm.train.accumulation import accumulate_contrastive_gradients
from mmlm.train.config import load_train_config
from mmlm.train.loop import contrastive_loss

BATCH, VOCAB = 8, 100


def _model(family: str) -> DualEncoder:
    vision = VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32, embed_dim=8)
    text = TextConfig(vocab_size=VOCAB, context_length=6, width=16, layers=1, heads=2, mlp_dim=32, embed_dim=8,
                      eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)  # fmt: skip
    cfg = DualEncoderConfig.siglip(vision, text) if family == "siglip" else DualEncoderConfig(vision, text)
    torch.manual_seed(0)
    return DualEncoder(cfg).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VOCAB - 1, (BATCH, 6), generator=g)
    ids[:, -1] = VOCAB - 1  # the end token the text tower pools at
    return pixels, ids


def _loss(family: str):
    return lambda image, text, scale, bias: contrastive_loss(family, image, text, scale, bias)


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _one_big_batch(family: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = _model(family)
    image, text = model(*_batch())
    loss = _loss(family)(image, text, model.logit_scale, model.logit_bias)
    loss.backward()
    return loss.detach(), _gradients(model)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_loss_and_gradients_equal_one_big_batch(family, k):
    expected_loss, expected_grads = _one_big_batch(family)
    model = _model(family)
    pixels, ids = _batch()
    micro_batches = list(zip(pixels.chunk(k), ids.chunk(k), strict=True))  # k micro-batches of BATCH / k
    loss = accumulate_contrastive_gradients(model, model, micro_batches, _loss(family))
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    grads = _gradients(model)
    assert grads.keys() == expected_grads.keys() and ("logit_bias" in grads) == (family == "siglip")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_per_micro_batch_losses_differ_from_one_big_batch():
    # the old behaviour (each micro-batch its own negatives) is measurably different: what the above guards
    expected_loss, _ = _one_big_batch("clip")
    model = _model("clip")
    pixels, ids = _batch()
    with torch.no_grad():
        halves = [_loss("clip")(*model(p, i), model.logit_scale, None) for p, i in zip(pixels.chunk(2), ids.chunk(2), strict=True)]  # fmt: skip
    assert abs(sum(halves).item() / 2 - expected_loss.item()) > 1e-3


class _DropoutNet(nn.Module):
    """The dual encoder with dropout on its embeddings: a forward that draws random numbers."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, text = self.model(pixels, ids)
        return F.dropout(image, 0.5), F.dropout(text, 0.5)


def test_the_forward_with_gradients_sees_the_cached_forwards_dropout_masks():
    pixels, ids = _batch()
    reference = _model("clip")
    torch.manual_seed(7)
    features = [_DropoutNet(reference)(p, i) for p, i in zip(pixels.chunk(2), ids.chunk(2), strict=True)]
    image, text = (torch.cat(f) for f in zip(*features, strict=True))
    expected_loss = _loss("clip")(image, text, reference.logit_scale, None)
    expected_loss.backward()
    after_reference = torch.get_rng_state()

    model = _model("clip")
    torch.manual_seed(7)
    micro_batches = list(zip(pixels.chunk(2), ids.chunk(2), strict=True))
    loss = accumulate_contrastive_gradients(_DropoutNet(model), model, micro_batches, _loss("clip"))
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-6, rtol=0)
    expected_grads = _gradients(reference)
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(torch.get_rng_state(), after_reference)  # the stream goes on as without the extra pass


def test_accumulation_below_one_is_refused():
    with pytest.raises(InputError, match=r"^optim.accumulation: got 0; expected a positive count$"):
        load_train_config(None, ["optim.accumulation=0"])
