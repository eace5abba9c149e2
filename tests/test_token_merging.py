"""Token Merging (Bolya et al. 2023) in the ViT: r = 0 changes nothing, each block merges r tokens, a merge is a
size-weighted mean, proportional attention counts a merged key as its copies, and the planner's count is right."""

import pytest
import torch

from mmlm.layers import Attention, Block
from mmlm.models.budget import Backbone, ImageInput, plan_budget
from mmlm.models.config import config_from_dict
from mmlm.models.token_merging import (
    bipartite_soft_matching,
    merge_block,
    merge_blocks,
    merge_weighted_average,
    merged_token_counts,
    proportional_attention_bias,
)
from mmlm.models.vision import VisionConfig, VisionTransformer


def tower(class_token: bool = True, layers: int = 3, **overrides) -> VisionTransformer:
    """A tiny random CLIP-like (class token) or SigLIP-like (none) ViT: 32 px, patch 8, so 16 patches."""
    siglip = dict(class_token=False, pre_norm=False, patch_bias=True, pool="mean", embed_dim=None)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=layers, heads=4, mlp_dim=64,
                       **({} if class_token else siglip), **overrides)  # fmt: skip
    torch.manual_seed(0)
    return VisionTransformer(cfg).eval()


def test_off_by_default_and_old_configs_load_without_it():
    assert VisionConfig().merge_tokens == 0
    assert config_from_dict(VisionConfig, {"width": 64}).merge_tokens == 0


def test_r_zero_is_exactly_the_original_vit():
    model, pixels = tower(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.norm_pre(model.embed(pixels))
        reference, _ = model.transformer(x)
        merged, states = merge_blocks(model.transformer.blocks, x, 0, class_token=True)
        out, size = merge_block(model.transformer.blocks[0], x, None, 0, True)
    assert torch.equal(merged, reference) and len(states) == 4
    assert torch.equal(out, model.transformer.blocks[0](x)) and size is None


@pytest.mark.parametrize("class_token", [True, False])
def test_each_block_merges_exactly_r_tokens(class_token):
    model = tower(class_token, merge_tokens=2)
    with torch.no_grad():
        _, states = model.forward_features(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    n = 16 + class_token
    assert [s.shape[1] for s in states] == [n, n - 2, n - 4, n - 6]  # N − l·r after block l
    assert merged_token_counts(n, 3, 2, class_token) == [n - 2, n - 4, n - 6]


@pytest.mark.parametrize(
    ("class_token", "expected"), [(True, [9, 5, 3, 2, 2, 2]), (False, [8, 4, 2, 1, 1, 1])]
)
def test_a_large_r_is_capped_and_one_patch_token_always_remains(class_token, expected):
    # bipartite matching merges at most half of the mergeable tokens per block; the class token is never merged
    model = tower(class_token, layers=6, merge_tokens=100)
    with torch.no_grad():
        _, states = model.forward_features(torch.randn(1, 3, 32, 32), output_hidden_states=True)
    assert [s.shape[1] for s in states[1:]] == expected
    assert merged_token_counts(16 + class_token, 6, 100, class_token) == expected


def orthogonal_metric(tokens: int, same: tuple[int, int]) -> torch.Tensor:
    """A [1, T, T] metric of one-hot rows (all pairs dissimilar) where tokens `same` are identical."""
    metric = torch.eye(tokens)[None]
    metric[0, same[1]] = metric[0, same[0]]
    return metric


def test_merging_two_identical_tokens_keeps_their_size_weighted_mean():
    x = torch.arange(6 * 3, dtype=torch.float32).reshape(1, 6, 3)
    merge, r = bipartite_soft_matching(orthogonal_metric(6, (2, 3)), 1, class_token=False)  # 2 in A, 3 in B
    out, size = merge_weighted_average(merge, x, None)
    assert r == 1 and out.shape == (1, 5, 3)
    # order: unmerged A tokens (0, 4), then every B token (1, 3, 5); token 3 now holds the mean of 2 and 3
    torch.testing.assert_close(
        out[0], torch.stack([x[0, 0], x[0, 4], x[0, 1], (x[0, 2] + x[0, 3]) / 2, x[0, 5]])
    )
    assert size[0, :, 0].tolist() == [1, 1, 1, 2, 1]
    # sizes weight the mean: a token standing for 3 patches merged with one standing for 1
    out, size = merge_weighted_average(merge, x, torch.tensor([1.0, 1, 3, 1, 1, 1]).reshape(1, 6, 1))
    torch.testing.assert_close(out[0, 3], (3 * x[0, 2] + x[0, 3]) / 4)
    assert size[0, 3, 0] == 4


def test_the_class_token_is_never_merged_and_stays_first():
    x = torch.randn(1, 5, 4)
    merge, r = bipartite_soft_matching(orthogonal_metric(5, (0, 1)), 1, class_token=True)  # cls ≡ token 1
    out, _ = merge_weighted_average(merge, x, None)
    assert r == 1 and torch.equal(out[0, 0], x[0, 0])
    assert not any(torch.allclose(row, (x[0, 0] + x[0, 1]) / 2) for row in out[0])


def test_proportional_attention_weighs_a_merged_key_as_its_copies():
    # ToMe eq. 1: softmax(q·kᵀ/√d + log s) — a key of size 3 attends like 3 identical keys
    torch.manual_seed(0)
    attn = Attention(16, heads=4).double().eval()
    a, b, c = torch.randn(3, 1, 1, 16, dtype=torch.float64)
    copies = torch.cat([a, b, b, b, c], dim=1)
    merged = torch.cat([a, b, c], dim=1)
    size = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64).reshape(1, 3, 1)
    out = attn(merged, mask=proportional_attention_bias(size, merged.dtype))
    reference = attn(copies)
    torch.testing.assert_close(out[:, [0, 1, 2]], reference[:, [0, 1, 4]])


def test_merge_block_runs_attention_then_merge_then_mlp():
    torch.manual_seed(0)
    block = Block(16, 4, 32).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        out, size = merge_block(block, x, None, 3, class_token=True)
    assert out.shape == (2, 6, 16) and size.shape == (2, 6, 1)
    assert size.sum(1).flatten().tolist() == [9.0, 9.0]  # every original token is counted once


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize(("image_size", "r"), [(32, 2), (48, 3), (32, 9)])
def test_the_tower_makes_the_token_count_the_planner_predicts(class_token, image_size, r):
    # training-free: random weights, any resolution (positions are resized), the VLM's layer −2 and the full pass
    model = tower(class_token, layers=4, merge_tokens=r)
    pixels = torch.randn(1, 3, image_size, image_size)
    vlm = Backbone(model.cfg, feature_layers=(-2,), feature_select="default")
    encoder = Backbone(model.cfg, encoder_head=True)
    with torch.no_grad():
        features = model.layer_features(pixels, [-2])[0][:, 1:]  # default select drops the first token
        tokens, _ = model.forward_features(pixels)
    assert features.shape[1] == plan_budget(vlm, ImageInput(image_size, merge_tokens=r)).features
    assert tokens.shape[1] == plan_budget(encoder, ImageInput(image_size, merge_tokens=r)).vision.tokens
