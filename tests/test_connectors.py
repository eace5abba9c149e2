"""Connectors: output shapes and token counts, the exact pixel-shuffle order, LLaVA projector parity, errors."""

import pytest
import torch

from mmlm.errors import InputError
from mmlm.fusion import (
    CONNECTORS,
    LLAVA_PROJECTOR_KEYS,
    STYLES,
    ConnectorConfig,
    build_connector,
    pixel_shuffle,
    register_connector,
)
from mmlm.fusion.projector import LinearProjector


@pytest.mark.parametrize(
    ("kind", "num_patches", "expected_tokens"),
    [("linear", 16, 16), ("mlp", 16, 16), ("pixel_shuffle", 16, 4), ("pixel_shuffle", 64, 16)],
)
def test_shapes_and_token_counts(kind, num_patches, expected_tokens) -> None:
    connector = build_connector(ConnectorConfig(kind=kind), vision_dim=6, lm_dim=10)
    out = connector(torch.randn(3, num_patches, 6))
    assert out.shape == (3, expected_tokens, 10)
    assert connector.num_tokens(num_patches) == expected_tokens


def test_pixel_shuffle_hand_computed_4x4() -> None:
    # A 4×4 grid of 1-channel tokens numbered row-major; r=2 gathers each 2×2 block, blocks in row-major order.
    x = torch.arange(16.0).reshape(1, 16, 1)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pixel_shuffle_channels_are_token_major() -> None:
    # With D=2, each output token holds the block's tokens one after another: [t0_d0, t0_d1, t1_d0, ...].
    x = torch.stack([torch.arange(16.0), 100 + torch.arange(16.0)], dim=-1)[None]  # [1, 16, 2]
    assert pixel_shuffle(x, 2)[0, 1].tolist() == [2, 102, 3, 103, 6, 106, 7, 107]


def test_pixel_shuffle_matches_idefics3() -> None:
    idefics3 = pytest.importorskip("transformers.models.idefics3.modeling_idefics3")
    x = torch.randn(2, 36, 5)
    for r in (2, 3):
        reference = idefics3.Idefics3Connector.pixel_shuffle(None, x, scale_factor=r)
        torch.testing.assert_close(pixel_shuffle(x, r), reference, rtol=0, atol=0)


def test_pixel_shuffle_non_square_grid() -> None:
    x = torch.arange(8.0).reshape(1, 8, 1)  # a 2×4 grid
    assert pixel_shuffle(x, 2, grid=(2, 4))[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize(("num_patches", "field"), [(36, "scale_factor"), (12, "num_patches")])
def test_pixel_shuffle_rejects_grids_it_cannot_divide(num_patches, field) -> None:
    connector = build_connector(ConnectorConfig(kind="pixel_shuffle", scale_factor=4), 4, 8)
    with pytest.raises(InputError, match=field):
        connector.num_tokens(num_patches)
    with pytest.raises(InputError, match=field):
        connector(torch.randn(1, num_patches, 4))


def test_mlp_matches_transformers_llava_projector() -> None:
    llava = pytest.importorskip("transformers.models.llava.modeling_llava")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=12, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=20, num_attention_heads=2),
    )
    torch.manual_seed(0)
    reference = llava.LlavaMultiModalProjector(config)
    ours = build_connector(ConnectorConfig(kind="mlp"), vision_dim=12, lm_dim=20)
    renamed = {}
    for key, value in reference.state_dict().items():
        module, name = key.split(".")
        renamed[f"{LLAVA_PROJECTOR_KEYS[module]}.{name}"] = value
    ours.load_state_dict(renamed)
    x = torch.randn(2, 9, 12)
    torch.testing.assert_close(ours(x), reference(x))


def test_bias_defaults_follow_the_references() -> None:
    assert build_connector(ConnectorConfig(kind="mlp"), 4, 8).fc1.bias is not None
    assert build_connector(ConnectorConfig(kind="pixel_shuffle"), 4, 8).proj.bias is None
    assert build_connector(ConnectorConfig(kind="linear", bias=False), 4, 8).proj.bias is None


def test_unknown_kind_names_the_field_and_registry_extends() -> None:
    with pytest.raises(InputError, match="connector.kind.*'resampler'"):
        build_connector(ConnectorConfig(kind="resampler"), 4, 8)
    register_connector("resampler", lambda cfg, dv, dl: LinearProjector(dv, dl))
    try:
        assert isinstance(build_connector(ConnectorConfig(kind="resampler"), 4, 8), LinearProjector)
    finally:
        del CONNECTORS["resampler"], STYLES["resampler"]
