"""Flamingo: the gated block is the identity at init, the media mask, resampler shapes, parity with Idefics (v1)."""

import pytest
import torch
import torch.nn.functional as F

from mmlm.checkpoints.hf_idefics import idefics_gated_cross_attention_key_map, idefics_perceiver_key_map
from mmlm.checkpoints.keymap import to_ours, to_theirs
from mmlm.fusion import ConnectorConfig, PerceiverResampler, build_connector
from mmlm.fusion.cross_attention import GatedCrossAttentionBlock, media_attention_mask
from mmlm.layers import Attention

IMAGE = 7  # the <image> token id in these tests


def _randomise(module: torch.nn.Module, scale: float = 0.3) -> None:
    # every weight random, norms and α included, so a swapped or missing tensor shows in the outputs
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if p.dim() == 1 and "alpha" not in name else 0.0))


@pytest.mark.parametrize("alpha_type", ["float", "vector"])
def test_gated_block_is_identity_at_init(alpha_type) -> None:
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(
        16, 12, heads=2, head_dim=8, mlp_dim=32, alpha_type=alpha_type, qk_norm=True
    )
    x, media = 3 * torch.randn(2, 6, 16), torch.randn(2, 8, 12)
    mask = torch.rand(2, 6, 8) > 0.5
    mask[0, :2] = False  # some rows see no media
    assert torch.equal(block(x, media, mask), x)
    assert torch.equal(block(x, media), x)


def test_media_mask_hand_computed() -> None:
    ids = torch.tensor([[1, IMAGE, 2, 3, IMAGE, 4], [1, 2, IMAGE, 3, 0, 0]])
    mask = media_attention_mask(ids, IMAGE, num_media_tokens=2)
    assert mask.shape == (2, 6, 4)  # M = 2 images (row 0), 2 tokens each
    none, first, second = [False] * 4, [True, True, False, False], [False, False, True, True]
    assert mask[0].tolist() == [none, first, first, first, second, second]
    assert mask[1].tolist() == [none, none, first, first, first, first]


def test_media_mask_without_images_is_empty() -> None:
    assert media_attention_mask(torch.tensor([[1, 2, 3]]), IMAGE, 4).shape == (1, 3, 0)


def _trained_block() -> GatedCrossAttentionBlock:
    torch.manual_seed(1)
    block = GatedCrossAttentionBlock(16, 12, heads=2, head_dim=8, mlp_dim=32)
    _randomise(block)
    with torch.no_grad():
        block.alpha_attn.fill_(1.0)
        block.alpha_mlp.fill_(0.5)
    return block


def test_text_before_the_first_image_sees_nothing() -> None:
    block, n = _trained_block(), 3
    ids = torch.tensor([[1, 2, IMAGE, 3, IMAGE, 4]])
    mask = media_attention_mask(ids, IMAGE, n)
    x, media = torch.randn(1, 6, 16), torch.randn(1, 2 * n, 12)
    attended = block.cross_attention(x, media, mask)
    assert not attended.isnan().any()
    assert torch.equal(attended[0, :2], torch.zeros(2, 16))
    assert attended[0, 2:].abs().min() > 0
    # the full block: those positions do not depend on the media at all
    other = block(x, torch.randn(1, 2 * n, 12), mask)
    assert torch.equal(block(x, media, mask)[0, :2], other[0, :2])
    # a batch with no image at all: media [B, 0, Dm], mask [B, T, 0]
    empty = media_attention_mask(torch.tensor([[1, 2, 3]]), IMAGE, n)
    out = block(x[:, :3], torch.zeros(1, 0, 12), empty)
    assert torch.equal(block.cross_attention(x[:, :3], torch.zeros(1, 0, 12), empty), torch.zeros(1, 3, 16))
    assert not out.isnan().any()


def test_text_after_image_two_sees_only_image_two() -> None:
    block, n = _trained_block(), 3
    ids = torch.tensor([[1, IMAGE, 2, 3, IMAGE, 4, 5]])
    mask = media_attention_mask(ids, IMAGE, n)
    assert mask[0, 4:].tolist() == [[False] * n + [True] * n] * 3
    x, media = torch.randn(1, 7, 16), torch.randn(1, 2 * n, 12)
    perturbed = media.clone()
    perturbed[:, :n] += 5 * torch.randn(1, n, 12)  # image 1's tokens
    before, after = block(x, media, mask), block(x, perturbed, mask)
    torch.testing.assert_close(after[0, 4:], before[0, 4:], rtol=0, atol=0)
    assert (after[0, 1:4] - before[0, 1:4]).abs().min() > 0  # text after image 1 does read it


@pytest.mark.parametrize(("patches", "frames"), [(5, None), (11, None), (5, 1), (5, 3), (9, 4)])
def test_resampler_emits_num_latents_tokens(patches, frames) -> None:
    resampler = PerceiverResampler(12, depth=2, num_latents=6, heads=2, head_dim=4, mlp_dim=24, max_frames=4)
    shape = (2, patches, 12) if frames is None else (2, frames, patches, 12)
    assert resampler(torch.randn(shape)).shape == (2, 6, 12)


def test_resampler_time_embedding_orders_frames() -> None:
    torch.manual_seed(0)
    video = torch.randn(1, 3, 4, 8)
    swapped = video[:, [2, 1, 0]]
    plain = PerceiverResampler(8, depth=1, num_latents=3, heads=2, head_dim=4, mlp_dim=16)
    # without time embeddings attention is a set operation: frame order cannot matter
    torch.testing.assert_close(plain(video), plain(swapped), rtol=0, atol=1e-6)
    # weights as after training: at the fresh N(0, 0.02²) attention is near uniform, and a uniform mean over
    # frames plus their time embeddings is itself order-free
    timed = PerceiverResampler(8, depth=1, num_latents=3, heads=2, head_dim=4, mlp_dim=16, max_frames=3,
                               init_std=0.5)  # fmt: skip
    assert (timed(video) - timed(swapped)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="frames"):
        timed(torch.randn(1, 4, 4, 8))


@pytest.mark.parametrize(("vision_dim", "lm_dim"), [(12, 20), (12, 12)])
def test_perceiver_connector_registered(vision_dim, lm_dim) -> None:
    cfg = ConnectorConfig(kind="perceiver", num_queries=5, depth=1, heads=2, max_frames=2)
    connector = build_connector(cfg, vision_dim=vision_dim, lm_dim=lm_dim)
    assert connector.num_tokens(49) == 5
    assert connector(torch.randn(3, 7, vision_dim)).shape == (3, 5, lm_dim)
    assert connector(torch.randn(3, 2, 7, vision_dim)).shape == (3, 5, lm_dim)
    assert isinstance(connector.proj, torch.nn.Identity) == (vision_dim == lm_dim)


def test_self_attention_qk_norm_formula() -> None:
    # layers.Attention's qk_norm (added for Idefics) on the self-attention path: per-head RMSNorm of q and k
    torch.manual_seed(0)
    attn = Attention(12, heads=3, kv_heads=1, qk_norm="rms")
    _randomise(attn)
    x = torch.randn(2, 5, 12)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split([12, 4, 4], dim=-1)
    q = F.rms_norm(q.unflatten(-1, (3, 4)), (4,), attn.q_norm.weight, 1e-6).transpose(1, 2)
    k = (
        F.rms_norm(k.unflatten(-1, (1, 4)), (4,), attn.k_norm.weight, 1e-6)
        .transpose(1, 2)
        .expand(-1, 3, -1, -1)
    )
    v = v.unflatten(-1, (1, 4)).transpose(1, 2).expand(-1, 3, -1, -1)
    weights = (q @ k.transpose(-1, -2) / 2).softmax(-1)  # √head_dim = 2
    expected = attn.out(torch.flatten((weights @ v).transpose(1, 2), 2))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)


# --- parity with transformers' Idefics (v1) -------------------------------------------------------------------


def _idefics_config(**kw):
    from transformers import IdeficsConfig

    vision = {"embed_dim": kw.pop("vision_dim")}
    perceiver = {"qk_layer_norms_perceiver": kw.pop("qk_layer_norms_perceiver", False)}
    config = IdeficsConfig(vision_config=vision, perceiver_config=perceiver, **kw)
    config._attn_implementation = "eager"
    return config


@pytest.mark.parametrize(
    ("dim", "depth", "heads", "head_dim", "latents", "qk_layer_norms"),
    [(12, 2, 2, 5, 4, False), (16, 3, 4, 6, 7, True)],
)
def test_perceiver_matches_idefics(dim, depth, heads, head_dim, latents, qk_layer_norms) -> None:
    idefics = pytest.importorskip("transformers.models.idefics.perceiver")
    config = _idefics_config(vision_dim=dim, qk_layer_norms_perceiver=qk_layer_norms)
    torch.manual_seed(0)
    reference = idefics.IdeficsPerceiverResampler(config, dim, depth, heads, head_dim, latents).eval()
    _randomise(reference)
    # Idefics' MLP width is fixed at 4 × the vision width; Idefics has no time embedding (max_frames = 0)
    ours = PerceiverResampler(dim, depth, latents, heads, head_dim, 4 * dim, qk_layer_norms=qk_layer_norms)
    rules = idefics_perceiver_key_map(depth, heads, head_dim, qk_layer_norms)
    theirs = {f"model.perceiver_resampler.{k}": v for k, v in reference.state_dict().items()}
    ours.load_state_dict(
        to_ours(theirs, rules, {k: v.shape for k, v in ours.state_dict().items()}, "idefics")
    )
    for patches in (9, 20):
        features = torch.randn(3, patches, dim)
        torch.testing.assert_close(ours(features), reference(features), rtol=0, atol=1e-5)
    back = to_theirs(ours.state_dict(), rules)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize(
    ("dim", "vision_dim", "heads", "mlp_dim", "act", "qk_layer_norms", "alpha_type"),
    [(16, 12, 2, 24, "silu", False, "float"), (24, 20, 3, 40, "gelu", True, "vector")],
)
def test_gated_cross_attention_matches_idefics(
    dim, vision_dim, heads, mlp_dim, act, qk_layer_norms, alpha_type
):
    idefics = pytest.importorskip("transformers.models.idefics.modeling_idefics")
    config = _idefics_config(vision_dim=vision_dim, hidden_size=dim, num_attention_heads=heads,
                             intermediate_size=mlp_dim, hidden_act=act, qk_layer_norms=qk_layer_norms,
                             alpha_type=alpha_type)  # fmt: skip
    torch.manual_seed(0)
    reference = idefics.IdeficsGatedCrossAttentionLayer(config, layer_idx=0).eval()
    _randomise(reference)
    ours = GatedCrossAttentionBlock(dim, vision_dim, heads, dim // heads, mlp_dim, act=act,
                                    alpha_type=alpha_type, qk_norm=qk_layer_norms)  # fmt: skip
    rules = idefics_gated_cross_attention_key_map(dim, heads, dim // heads, qk_layer_norms, alpha_type)
    theirs = {f"model.gated_cross_attn_layers.0.{k}": v for k, v in reference.state_dict().items()}
    ours.load_state_dict(
        to_ours(theirs, rules, {k: v.shape for k, v in ours.state_dict().items()}, "idefics")
    )
    assert ours.alpha_attn.abs().min() > 0  # random α, so both branches count

    n = 3
    ids = torch.tensor([[1, 2, IMAGE, 3, IMAGE, 4, 5], [IMAGE, 1, 2, 3, 4, 0, 0]])
    mask = media_attention_mask(ids, IMAGE, n)  # [2, 7, 6]; row 1 has one image, its slots 3..5 are padding
    x, media = torch.randn(2, 7, dim), torch.randn(2, 2 * n, vision_dim)
    # Idefics' inputs, as IdeficsModel builds them: an additive mask and a 0/1 gate for rows that see an image
    additive = torch.where(mask[:, None], 0.0, torch.finfo(torch.float32).min)
    gate = mask.any(-1).float()
    expected = reference(
        x, image_hidden_states=media, image_attention_mask=additive, cross_attention_gate=gate
    )
    torch.testing.assert_close(ours(x, media, mask), expected, rtol=0, atol=1e-5)
    back = to_theirs(ours.state_dict(), rules)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
