"""Gradient checkpointing in VLM training: the same loss and gradients, with every block recomputed in backward;
and AdamW's fused kernel on CUDA only."""

import pytest
import torch

from mmlm.fusion import ConnectorConfig
from mmlm.layers.transformer import Block, Transformer, set_grad_checkpointing
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.vision import VisionConfig
from mmlm.models.vlm import VisionLanguageModel, VLMConfig
from mmlm.train.vlm_config import StageConfig
from mmlm.train.vlm_loop import RowLosses, batch_loss, length_groups, stage_optimizer

IMAGE = 99


def tiny_vlm() -> VisionLanguageModel:
    """A float64 VLM whose ViT runs 2 of its 3 blocks (features from −2) into an LM of 2 blocks."""
    vision = VisionConfig(
        image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, embed_dim=None
    )
    lm = LMConfig(vocab_size=120, width=32, layers=2, heads=2, kv_heads=1, mlp_dim=64, max_positions=128)
    torch.manual_seed(0)
    cfg = VLMConfig(vision, lm, ConnectorConfig(kind="mlp"), image_token_id=IMAGE, feature_layers=[-2])
    return VisionLanguageModel(cfg).double().train()


def training_batch() -> tuple[torch.Tensor, ...]:
    """Two rows of equal length (one LM group), each with one image of 16 slots, answers labelled."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, 90, (2, 8), generator=generator)
    ids = torch.cat([text[:, :2], torch.full((2, 16), IMAGE), text[:, 2:]], dim=1)  # [2, 24]
    labels = ids.masked_fill(ids == IMAGE, -100)
    labels[:, :20] = -100  # the answer: the last 4 tokens
    pixels = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    return ids, labels, torch.ones_like(ids), pixels


def loss_and_gradients(model: VisionLanguageModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = batch_loss(*RowLosses(model)(*training_batch()))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_keeps_the_loss_and_every_gradient():
    model = tiny_vlm()
    loss, grads = loss_and_gradients(model)
    set_grad_checkpointing(model, True)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model)
    assert model.lm.grad_checkpointing and model.vision.transformer.grad_checkpointing
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-12)
    assert checkpointed_grads.keys() == grads.keys()
    assert any(n.startswith("vision.transformer.blocks.") for n in grads)  # the ViT's blocks are in it
    assert any(n.startswith("lm.blocks.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def block_runs(model: VisionLanguageModel) -> tuple[int, int]:
    """Return how many times blocks ran forward during the forward pass and during backward."""
    runs, phase = {"forward": 0, "backward": 0}, ["forward"]

    def count(module, args) -> None:
        runs[phase[0]] += 1

    # a pre-hook: recomputation stops once it has the saved tensors backward needs (torch's early stop), so a
    # block recomputed in backward may never return
    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, Block)]
    loss = batch_loss(*RowLosses(model)(*training_batch()))
    phase[0] = "backward"
    loss.backward()
    for hook in hooks:
        hook.remove()
    return runs["forward"], runs["backward"]


def test_checkpointing_recomputes_every_block_in_backward():
    model = tiny_vlm()
    assert block_runs(model) == (4, 0)  # 2 ViT blocks + 2 LM blocks, activations kept
    set_grad_checkpointing(model, True)
    assert block_runs(model) == (4, 4)  # each block runs again in backward
    model.eval()
    assert block_runs(model) == (4, 0)  # evaluation never checkpoints


def test_generation_with_checkpointing_on_matches_off():
    model = tiny_vlm().eval()
    ids = torch.tensor([[5, 6, 7]])
    cache = model.lm.new_cache(1)
    with torch.no_grad():
        plain = model.lm(ids, cache=cache).logits
        set_grad_checkpointing(model, True)
        model.train()  # a KV cache is never recomputed, even in training mode
        checkpointed = model.lm(ids, cache=model.lm.new_cache(1)).logits
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@pytest.mark.parametrize(("device", "fused"), [("cuda", True), ("cpu", None), ("mps", None)])
def test_adamw_is_fused_on_cuda_only(device, fused):
    model = tiny_vlm().float()
    opt = stage_optimizer(model, StageConfig(train=["connector", "lm"]), torch.device(device))
    assert opt.defaults["fused"] is fused
    assert all(g["fused"] is fused for g in opt.param_groups)


def test_rows_of_one_length_run_the_lm_once():
    assert [g.tolist() for g in length_groups(torch.tensor([7, 7, 7]))] == [[0, 1, 2]]
    assert [sorted(g.tolist()) for g in length_groups(torch.tensor([9, 3, 9, 9]))] == [[1], [0, 2, 3]]


def test_a_checkpointed_transformer_stack_keeps_its_gradients():
    torch.manual_seed(0)
    stack = Transformer(3, dim=16, heads=2, mlp_dim=32).double().train()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]  # the CLIP trainer's path

    def gradients() -> list[torch.Tensor]:
        stack.zero_grad(set_to_none=True)
        x.grad = None
        stack(x, mask=mask)[0].square().sum().backward()
        return [x.grad.clone(), *(p.grad for p in stack.parameters())]

    plain = gradients()
    stack.grad_checkpointing = True
    for checkpointed, reference in zip(gradients(), plain, strict=True):
        torch.testing.assert_close(checkpointed, reference, rtol=1e-10, atol=1e-12)
