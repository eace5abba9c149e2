"""BLIP-2 Q-Former connector: parity with transformers' Blip2QFormerModel, loading folders, K tokens, bad input."""

import json

import pytest
import torch

from mmlm.checkpoints.hf_blip2 import blip2_connector_from_state_dict, load_blip2_qformer
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig, build_connector

blip_2 = pytest.importorskip("transformers.models.blip_2.modeling_blip_2")
from transformers import Blip2Config, OPTConfig  # noqa: E402

# (num_query_tokens, qformer_config, vision hidden_size = encoder_hidden_size); all differ from the Q-Former width
CONFIGS = {
    "k5-every2-heads2": (5, dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20,
                                 cross_attention_frequency=2), 12),
    "k3-every1-heads4": (3, dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                 cross_attention_frequency=1), 8),
    "k7-every2-heads3-tanh": (7, dict(hidden_size=12, num_hidden_layers=4, num_attention_heads=3, intermediate_size=30,
                                      cross_attention_frequency=2, hidden_act="gelu_new", layer_norm_eps=1e-6), 20),
}  # fmt: skip
LM_WIDTH = 18


def tiny_blip2_config(name: str) -> Blip2Config:
    num_queries, qformer, vision_width = CONFIGS[name]
    return Blip2Config(
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4),
        qformer_config=qformer,
        text_config=OPTConfig(vocab_size=40, hidden_size=LM_WIDTH, word_embed_proj_dim=LM_WIDTH, ffn_dim=24,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32).to_dict(),
        num_query_tokens=num_queries,
    )  # fmt: skip


def tiny_blip2(name: str, cls=blip_2.Blip2ForConditionalGeneration):
    """A transformers BLIP-2 with every connector tensor perturbed (its init zeroes the queries, LN is 1 and 0)."""
    torch.manual_seed(0)
    model = cls(tiny_blip2_config(name)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.startswith(("query_tokens", "qformer.", "language_projection.")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def reference_tokens(model, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    query_tokens = model.query_tokens.expand(feats.shape[0], -1, -1)
    out = model.qformer(query_embeds=query_tokens, encoder_hidden_states=feats, encoder_attention_mask=mask)
    return model.language_projection(out.last_hidden_state)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_qformer(name) -> None:
    reference = tiny_blip2(name)
    ours, cfg = blip2_connector_from_state_dict(reference.config.to_dict(), reference.state_dict())
    num_queries, qformer, vision_width = CONFIGS[name]
    assert (cfg.num_queries, cfg.width, cfg.depth) == (
        num_queries,
        qformer["hidden_size"],
        qformer["num_hidden_layers"],
    )
    feats = torch.randn(2, 9, vision_width)
    with torch.no_grad():
        expected, got = reference_tokens(reference, feats), ours(feats)
    assert got.shape == (2, num_queries, LM_WIDTH)
    assert (got - expected).abs().max() < 1e-5


def test_image_feature_mask_matches_transformers() -> None:
    reference = tiny_blip2("k5-every2-heads2")
    ours, _ = blip2_connector_from_state_dict(reference.config.to_dict(), reference.state_dict())
    feats = torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0  # the first image has 5 real features and 4 padded ones
    with torch.no_grad():
        expected, got = reference_tokens(reference, feats, mask), ours(feats, mask)
        unmasked = ours(feats)
    assert (got - expected).abs().max() < 1e-5
    assert (got[0] - unmasked[0]).abs().max() > 1e-3  # the mask did hide something
    assert (got[0] - ours(feats[:1, :5])[0]).abs().max() < 1e-5  # padding is as good as absent


@pytest.mark.parametrize("cls", [blip_2.Blip2ForConditionalGeneration, blip_2.Blip2Model])
def test_load_saved_folder_matches_image_features(tmp_path, cls) -> None:
    reference = tiny_blip2("k7-every2-heads3-tanh", cls)
    reference.save_pretrained(tmp_path)
    ours, cfg = load_blip2_qformer(tmp_path)
    assert cfg.kind == "qformer"
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        # what BLIP-2 feeds the Q-Former: the tower's last hidden state, class token included, post_layernorm-ed
        feats = reference.vision_model(pixel_values=pixels).last_hidden_state
        got = ours(feats)
        if cls is blip_2.Blip2ForConditionalGeneration:
            expected = reference.get_image_features(pixel_values=pixels).pooler_output
        else:
            expected = reference_tokens(reference, feats)
    assert (got - expected).abs().max() < 1e-5


def test_fixed_number_of_tokens_whatever_the_number_of_features() -> None:
    cfg = ConnectorConfig(
        kind="qformer", num_queries=6, depth=2, heads=2, width=8, cross_attention_frequency=2
    )
    connector = build_connector(cfg, vision_dim=10, lm_dim=14)
    for num_patches in (1, 5, 50):
        assert connector.num_tokens(num_patches) == 6
        assert connector(torch.randn(3, num_patches, 10)).shape == (3, 6, 14)


def test_queries_attend_to_each_other_bidirectionally() -> None:
    torch.manual_seed(0)
    connector = build_connector(
        ConnectorConfig(kind="qformer", num_queries=4, depth=1, heads=2, width=8), 6, 6
    )
    feats = torch.randn(1, 3, 6)
    with torch.no_grad():
        for param in connector.parameters():  # the init's near-uniform attention hides the effect
            param.normal_(0, 0.5)
        base = connector(feats)
        connector.qformer.query_tokens[0, -1] += torch.randn(8)  # change the last query only
        moved = connector(feats)
    assert (moved[0, 0] - base[0, 0]).abs().max() > 1e-4  # the first query saw the last one: no causal mask


def write_folder(tmp_path, edit_config=None, name: str = "k5-every2-heads2"):
    tiny_blip2(name).save_pretrained(tmp_path)
    if edit_config is not None:
        config = json.loads((tmp_path / "config.json").read_text())
        edit_config(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("edit_config", "message"),
    [
        (lambda c: c["qformer_config"].update(num_hidden_layers=4), "is missing"),  # the file has 3 layers
        (lambda c: c["qformer_config"].update(num_hidden_layers=2), "no place in the model"),
        (lambda c: c.update(num_query_tokens=4), "'query_tokens' has shape"),
        (
            lambda c: c["qformer_config"].update(intermediate_size=21),
            "intermediate_query.dense.weight' has shape",
        ),
        (
            lambda c: c["qformer_config"].update(num_attention_heads=3),
            "not a multiple of num_attention_heads",
        ),
        (lambda c: c.update(model_type="llava"), "expected 'blip-2'"),
    ],
)
def test_mismatched_checkpoint_is_an_input_error(tmp_path, edit_config, message) -> None:
    folder = write_folder(tmp_path, edit_config)
    with pytest.raises(InputError, match=message) as error:
        load_blip2_qformer(folder)
    assert "\n" not in str(error.value)


def test_folder_without_config_or_weights_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="config.json: not found"):
        load_blip2_qformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(InputError, match="no weights found"):
        load_blip2_qformer(tmp_path)


def test_layer_norm_eps_travels_in_the_connector_config():
    from mmlm.checkpoints.hf_blip2 import connector_config_from_blip2
    from mmlm.fusion import build_connector

    cfg = connector_config_from_blip2({"num_query_tokens": 3, "qformer_config": {
        "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "layer_norm_eps": 1e-6}})  # fmt: skip
    assert cfg.norm_eps == 1e-6
    connector = build_connector(cfg, vision_dim=8, lm_dim=12)  # as an mmlm checkpoint rebuilds it
    assert connector.qformer.query_norm.eps == 1e-6 and connector.qformer.blocks[0].norm1.eps == 1e-6
