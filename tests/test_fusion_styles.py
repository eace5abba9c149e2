"""One switch, `connector.kind`, picks the fusion style; processor, trainer, generation and checkpoints follow it."""

import dataclasses

import pytest
import torch

import mmlm
from mmlm.data.synthetic.shapes import split_combinations
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.fusion.unified import ImageCodebook
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.vision import VisionConfig
from mmlm.models.vlm import VisionLanguageModel, VLMConfig
from mmlm.train.mixing import corpus_texts
from mmlm.train.vlm_config import StageData, vlm_config_from_dict
from mmlm.train.vlm_loop import build_tokenizer, run_vlm_training

PATCHES = 16  # a 32 px image in 8 px patches
TINY = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 4, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
    "feature_layers": [-1],
}
# kind -> (connector options, what one image becomes in the LM's sequence, stage that trains)
STYLES = {
    "linear": ({}, PATCHES, ["connector", "lm"]),
    "mlp": ({}, PATCHES, ["connector", "lm"]),
    "pixel_shuffle": ({"scale_factor": 2}, PATCHES // 4, ["connector", "lm"]),
    "qformer": ({"num_queries": 5, "depth": 2, "heads": 2}, 5, ["connector", "lm"]),
    "perceiver": ({"num_queries": 6, "depth": 1, "heads": 2}, 6, ["connector", "lm"]),
    "cross_attention": (
        {"num_queries": 4, "depth": 1, "heads": 2, "cross_attn_every_n_layers": 2},
        1,
        ["connector"],
    ),
    "unified": ({"codebook_size": 24}, PATCHES, ["lm"]),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tokenizer")
    pairs, _ = split_combinations(0)
    data = [StageData(samples=200, multimodal_fraction=0.5, text_source="shapes", text_samples=200)]
    cfg = run_config(out, "mlp", None)
    return str(build_tokenizer(cfg, out, lambda: corpus_texts(data, 0, pairs)))


def run_config(out, kind: str, tokenizer: str | None, steps: int = 2):
    options, _, train = STYLES[kind]
    model = {**TINY, "connector": {"kind": kind, **options}, "tokenizer": tokenizer}
    stages = {
        "train": {
            "steps": steps,
            "train": train,
            "data": {"samples": 64, "multimodal_fraction": 0.9, "text_source": "shapes"},
        }
    }
    return vlm_config_from_dict({"model": model, "stages": stages, "batch_size": 4, "max_length": 64,
                                 "log_every": 1, "eval_samples": 0, "out_dir": str(out), "device": "cpu"})  # fmt: skip


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)


@pytest.mark.parametrize("kind", list(STYLES))
def test_every_style_trains_generates_and_round_trips(kind, tokenizer, tmp_path):
    loaded, records = run_vlm_training(run_config(tmp_path, kind, tokenizer))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert loaded.model.image_tokens == STYLES[kind][1]
    messages = [{"role": "user", "content": "<image>\nWhat color is the square?"}]
    image = torch.rand(3, 32, 32).mul(255).byte().permute(1, 2, 0).numpy()
    from PIL import Image

    picture = Image.fromarray(image)
    batch = loaded.processor(messages, [picture])
    assert int((batch["input_ids"] == loaded.config.image_token_id).sum()) == STYLES[kind][1]
    reply = loaded.generate(messages, [picture], max_new_tokens=4)
    assert isinstance(reply, str)

    reloaded = mmlm.load(tmp_path / "model")
    assert reloaded.config.connector.kind == kind
    with torch.no_grad():
        ours = loaded.model.eval()(batch["input_ids"], batch["pixel_values"]).logits
        theirs = reloaded.model(batch["input_ids"], batch["pixel_values"]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert reloaded.generate(messages, [picture], max_new_tokens=4) == reply


def tiny_vlm(kind: str, **connector) -> VisionLanguageModel:
    vision = VisionConfig(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=None
    )
    lm = LMConfig(vocab_size=120, width=32, layers=4, heads=2, kv_heads=1, mlp_dim=64, max_positions=128)
    cfg = VLMConfig(
        vision, lm, ConnectorConfig(kind=kind, **connector), image_token_id=99, feature_layers=[-1]
    )
    torch.manual_seed(0)
    return VisionLanguageModel(cfg).eval()


def ids_with_images(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows)


def test_cross_attention_fusion_is_the_base_lm_at_initialisation():
    model = tiny_vlm("cross_attention", num_queries=4, depth=1, heads=2, cross_attn_every_n_layers=2)
    ids = ids_with_images([[5, 99, 7, 8, 99, 9, 10], [11, 12, 99, 13, 14, 15, 16]])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        embeds, media = model.prepare(ids, pixels)
        fused = model.run_lm(embeds, media).logits
        base = model.lm(inputs_embeds=embeds).logits
    assert media is not None and media.tokens.shape == (2, 2 * 4, 32)  # two images at most per row, L = 4
    assert torch.equal(fused, base)
    for p in model.connector.blocks.parameters():  # once the gates open, the images change the output
        torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        opened = model.run_lm(*model.prepare(ids, pixels)).logits
    assert not torch.allclose(opened, base)
    # positions before a row's first image see no media: unchanged, bit for bit, only by the gated MLP
    with torch.no_grad():
        other = model.run_lm(*model.prepare(ids, torch.randn(3, 3, 32, 32))).logits
    torch.testing.assert_close(other[0, :1], opened[0, :1], rtol=0, atol=0)
    assert not torch.allclose(other[0, 1:], opened[0, 1:])


def open_gates(model: VisionLanguageModel) -> None:
    torch.manual_seed(1)
    for block in model.connector.blocks.values():
        block.alpha_attn.data.fill_(0.7)
        block.alpha_mlp.data.fill_(0.7)


def test_cross_attention_cached_decoding_and_batches_match(tokenizer, tmp_path):
    loaded, _ = run_vlm_training(run_config(tmp_path, "cross_attention", tokenizer, steps=1))
    open_gates(loaded.model)
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    prompts = ["<image> a <image> b", "the long question here <image> c", "plain text"]
    per_image = [[images[0], images[1]], [images[2]], []]
    batched = loaded.generate(prompts, per_image, max_new_tokens=6, cache="dynamic")
    alone = [loaded.generate(p, i, max_new_tokens=6) for p, i in zip(prompts, per_image, strict=True)]
    assert batched == alone
    # cached greedy decoding = recomputing the whole sequence at every step
    batch = loaded.processor(prompts[0], per_image[0])
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    tokens = loaded.generate_tokens(prompts[0], per_image[0], max_new_tokens=5)
    assert tokens
    with torch.no_grad():
        for token in tokens:
            logits = loaded.model(ids, pixels).logits[0, -1]
            assert int(logits.argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_image_codebook_round_trip_and_fit():
    codebook = ImageCodebook(8, 4)
    with pytest.raises(InputError, match="not fitted"):
        codebook.encode(torch.zeros(2, 4))
    torch.manual_seed(0)
    centres = torch.randn(8, 4) * 10
    features = (centres[torch.arange(400) % 8] + 0.01 * torch.randn(400, 4))[:, None]  # [400, 1, 4]
    error = codebook.fit(features)
    assert error < 1e-3  # eight well-separated clusters are found exactly
    codes = codebook.encode(features)  # [400, 1]
    assert torch.equal(codebook.encode(codebook.decode(codes)), codes)  # decode, then encode: the same codes
    # the same cluster always gets the same code, different clusters different codes
    assert len(set(codes[:8, 0].tolist())) == 8 and torch.equal(codes[:8], codes[8:16])
    with pytest.raises(InputError, match="use more images"):
        ImageCodebook(8, 4).fit(torch.randn(3, 4))


def test_unified_tokens_are_lm_words():
    model = tiny_vlm("unified", codebook_size=16)
    model.connector.fit(torch.randn(200, 32))
    ids = ids_with_images([[5] + [99] * PATCHES + [6]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels)
        codes = model.connector.encode(model.patch_features(pixels))[0]
    assert model.code_offset == 120 - 16
    torch.testing.assert_close(embeds[0, 1:-1], model.lm.token_embed.weight[model.code_offset + codes])
    with pytest.raises(InputError, match="codebook_size"):
        tiny_vlm("unified", codebook_size=500)


def test_unified_stage_without_lm_is_refused(tokenizer, tmp_path):
    cfg = run_config(tmp_path, "unified", tokenizer)
    cfg.stages["train"].train = ["connector"]
    with pytest.raises(InputError, match="no parameters"):
        run_vlm_training(cfg)


def test_every_style_is_a_registered_or_built_kind():
    for kind in STYLES:
        model = tiny_vlm(kind, **{k: v for k, v in STYLES[kind][0].items()})
        assert model.image_tokens == STYLES[kind][1]
    with pytest.raises(InputError, match="connector.kind"):
        tiny_vlm("resampler")
    assert dataclasses.asdict(ConnectorConfig())["kind"] == "mlp"


@pytest.mark.parametrize("kind", ["mlp", "perceiver"])
def test_token_merging_in_the_tower_sets_the_visual_token_count(kind):
    vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64, embed_dim=None,
                          merge_tokens=3)  # fmt: skip
    lm = LMConfig(vocab_size=120, width=32, layers=2, heads=2, kv_heads=1, mlp_dim=64, max_positions=128)
    for layers, merged in (
        ([-1], 17 - 3 * 3),
        ([-2], 17 - 2 * 3),
    ):  # 16 patches + class token, 3 merged per block
        cfg = VLMConfig(
            vision, lm, ConnectorConfig(kind=kind, num_queries=4, heads=2), 99, feature_layers=layers
        )
        model = VisionLanguageModel(cfg).eval()
        expected = merged - 1 if kind == "mlp" else 4  # the class token is dropped; the resampler makes 4
        assert model.image_tokens == expected
        with torch.no_grad():
            assert model.image_features(torch.randn(2, 3, 32, 32)).shape == (2, expected, 32)
    with pytest.raises(InputError, match="use one"):
        VisionLanguageModel(VLMConfig(vision, lm, ConnectorConfig(), 99, feature_layers=[-1, -2]))
