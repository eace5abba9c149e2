"""The shared building blocks against their defining equations."""

import math
import warnings

import pytest
import torch

from mmlm.layers import Attention, Block, KVCache, RMSNorm
from mmlm.layers.mlp import quick_gelu
from mmlm.models.config import config_from_dict
from mmlm.models.dual_encoder import DualEncoderConfig
from mmlm.models.vision import VisionConfig, VisionTransformer, patch_tokens


def reference_attention(q, k, v, causal=False):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(S - L), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_softmax_formula_with_grouped_kv(kv_heads, causal):
    torch.manual_seed(0)
    attn = Attention(32, heads=4, kv_heads=kv_heads).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q, k, v = attn.qkv(x).split([32, 8 * kv_heads, 8 * kv_heads], -1)
    q = q.view(2, 5, 4, 8).transpose(1, 2)
    k, v = (t.view(2, 5, kv_heads, 8).transpose(1, 2).repeat_interleave(4 // kv_heads, 1) for t in (k, v))
    expected = attn.out(reference_attention(q, k, v, causal).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x, is_causal=causal), expected)


def test_kv_cache_decoding_equals_full_causal_attention():
    torch.manual_seed(0)
    attn = Attention(16, heads=4, kv_heads=2).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    full = attn(x, is_causal=True)
    cache = KVCache()
    prefill = attn(x[:, :4], is_causal=True, cache=cache)
    steps = [attn(x[:, i : i + 1], is_causal=True, cache=cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full)
    assert cache.length == 7
    chunk_cache = KVCache()  # a multi-token chunk after a prefill needs the offset causal mask
    attn(x[:, :3], is_causal=True, cache=chunk_cache)
    torch.testing.assert_close(attn(x[:, 3:], is_causal=True, cache=chunk_cache), full[:, 3:])


def test_cross_attention_reads_the_context():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, cross=True, context_dim=12)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 9, 12)
    y = attn(x, context=ctx)
    assert y.shape == (2, 3, 16)
    assert not torch.allclose(y, attn(x, context=torch.randn(2, 9, 12)))


def test_post_norm_block_is_norm_of_residual():
    torch.manual_seed(0)
    block = Block(16, 2, 32, prenorm=False).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    h = block.norm1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(h + block.mlp(h)))
    pre = Block(16, 2, 32).double()
    h = x + pre.attn(pre.norm1(x))
    torch.testing.assert_close(pre(x), h + pre.mlp(pre.norm2(h)))


def test_rmsnorm_and_quick_gelu_formulas():
    x = torch.randn(3, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-6).double()
    torch.testing.assert_close(norm(x), x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quick_gelu_gradient_is_the_reference_formulas(dtype):
    # mmlm computes SiLU(1.702x)/1.702 (fused kernels); OpenAI CLIP and transformers write x·σ(1.702x)
    x = (torch.randn(4, 64, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    (ours,) = torch.autograd.grad(quick_gelu(x).sum(), x)
    (reference,) = torch.autograd.grad((x * torch.sigmoid(1.702 * x)).sum(), x)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


@pytest.mark.parametrize(("size", "patches"), [(224, 196), (448, 784)])
def test_patch_count_follows_resolution(size, patches):
    vit = VisionTransformer(
        VisionConfig(image_size=224, patch_size=16, width=16, layers=1, heads=2, mlp_dim=32)
    )
    tokens, _ = vit.forward_features(torch.randn(1, 3, size, size))
    assert tokens.shape == (1, patches + 1, 16)  # + the class token


def test_config_ignores_unknown_keys_with_a_warning():
    data = {"family": "siglip", "from_the_future": 1, "vision": {"width": 8, "new_knob": True}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = config_from_dict(DualEncoderConfig, data)
    assert cfg.family == "siglip" and cfg.vision.width == 8
    assert {"from_the_future", "new_knob"} <= {
        k for w in caught for k in ("from_the_future", "new_knob") if k in str(w.message)
    }


@pytest.mark.parametrize(
    "size, patch, bias",
    [((32, 32), 8, False), ((30, 45), 8, True), ((224, 224), 16, True), ((14, 28), 14, False)],
)
def test_patch_tokens_equal_the_strided_convolution(size, patch, bias):
    """The ViT's patch embedding as one matmul over p×p patches gives the convolution's numbers, remainder rows
    and columns dropped as the convolution drops them."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, patch, patch, bias=bias)
    pixels = torch.randn(2, 3, *size)
    tokens, grid = patch_tokens(pixels, conv)
    expected = conv(pixels)  # [B, D, rows, columns]
    assert grid == tuple(expected.shape[2:]) and tokens.is_contiguous()
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    shuffled = torch.nn.Conv2d(3, 24, patch, patch, bias=bias)
    shuffled.weight.data = conv.weight.data.transpose(2, 3).clone()  # (i, j) swapped: must not pass
    shuffled.bias = conv.bias
    assert not torch.allclose(patch_tokens(pixels, shuffled)[0], tokens, atol=1e-3)


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_patch_dropout_keeps_a_random_subset_per_image_only_in_training(pool):
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32, embed_dim=8,
                       pool=pool, class_token=pool == "cls", patch_dropout=0.5)  # fmt: skip
    vit = VisionTransformer(cfg).double()
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    seen = []
    vit.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    vit.train()
    vit(pixels)
    tokens = vit.norm_pre(vit.embed(pixels))  # every token before the blocks: 16 patches (+ the class token)
    n_cls = int(pool == "cls")
    kept = seen[-1]
    assert kept.shape == (3, n_cls + 8, 16)  # half of the 16 patches, the class token always
    torch.testing.assert_close(kept[:, :n_cls], tokens[:, :n_cls])
    subsets = []
    for image in range(3):  # every kept token is one of the image's own, each at most once
        match = (kept[image, n_cls:, None] - tokens[image, None, n_cls:]).abs().sum(-1) < 1e-12  # [8, 16]
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()
        subsets.append(frozenset(match.nonzero()[:, 1].tolist()))
    assert len(set(subsets)) > 1  # each image draws its own subset
    vit.eval()  # every patch at evaluation: the same embedding as the tower without dropout
    plain = VisionTransformer(VisionConfig(**{**vars(cfg), "patch_dropout": 0.0})).double()
    plain.load_state_dict(vit.state_dict())
    torch.testing.assert_close(vit(pixels), plain.eval()(pixels))
    assert seen[-1].shape == (3, n_cls + 16, 16)
    plain.train()  # without dropout, training sees every patch too
    torch.testing.assert_close(plain(pixels), vit(pixels))


@pytest.mark.parametrize("rate", ["1.0", "-0.1", '"half"'])
def test_a_bad_patch_dropout_is_refused_in_one_line(rate):
    from mmlm.errors import InputError
    from mmlm.train.config import load_train_config

    with pytest.raises(InputError, match=r"model.vision.patch_dropout: got .*; expected a share in \[0, 1\)"):
        load_train_config(None, [f"model.vision.patch_dropout={rate}"])
