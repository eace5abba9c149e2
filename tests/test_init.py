"""Fresh models start as their reference recipes initialise them, and loading a checkpoint never runs that init."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmlm
from fixtures_lm import write_tiny_lm
from mmlm.fusion import ConnectorConfig, build_connector
from mmlm.fusion.cross_attention import GatedCrossAttentionBlock
from mmlm.models.audio_encoder import AudioConfig
from mmlm.models.audio_tower import AudioTower
from mmlm.models.decoder_lm import DecoderLM, LMConfig
from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
WIDTH, LAYERS = 64, 3


def assert_std(tensor: torch.Tensor, std: float, name: str = "") -> None:
    """The sample std of a fresh tensor is `std` within 10% (every tensor here has 4096 draws or more)."""
    assert tensor.numel() >= 1024, name
    assert abs(tensor.float().std().item() - std) < 0.1 * std, (
        f"{name}: std {tensor.std():.4f}, want {std:.4f}"
    )


def assert_identity_norms(module: torch.nn.Module) -> None:
    """Every LayerNorm and RMSNorm starts as the identity: weight 1, bias 0."""
    norms = [m for m in module.modules() if type(m).__name__ in ("LayerNorm", "RMSNorm")]
    assert norms
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        bias = getattr(norm, "bias", None)  # RMSNorm has none
        assert bias is None or torch.equal(bias, torch.zeros_like(bias))


def assert_zero_biases(module: torch.nn.Module) -> None:
    """Every Linear of `module` starts with a zero bias."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert linears
    for linear in linears:
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))


def tiny_clip() -> DualEncoder:
    vision = VisionConfig(image_size=32, patch_size=4, width=WIDTH, layers=LAYERS, heads=4, mlp_dim=4 * WIDTH,
                          embed_dim=128)  # fmt: skip
    text = TextConfig(vocab_size=512, context_length=16, width=WIDTH, layers=LAYERS, heads=4,
                      mlp_dim=4 * WIDTH, embed_dim=128, eos_token_id=1)  # fmt: skip
    return DualEncoder(DualEncoderConfig(vision, text))


@pytest.mark.parametrize("tied", [True, False])
def test_fresh_lm_first_loss_is_near_log_vocab(tied: bool) -> None:
    torch.manual_seed(0)
    vocab = 1024
    lm = DecoderLM(LMConfig(vocab_size=vocab, width=WIDTH, layers=2, heads=4, kv_heads=2, mlp_dim=128,
                            tie_word_embeddings=tied))  # fmt: skip
    ids = torch.randint(0, vocab, (8, 32))
    with torch.no_grad():
        logits = lm(ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    # PyTorch's N(0, 1) embedding put a tied head near loss 60 here
    assert abs(loss - math.log(vocab)) < 0.1 * math.log(vocab)


def test_fresh_clip_first_loss_is_near_log_batch() -> None:
    torch.manual_seed(0)
    model, batch = tiny_clip(), 64
    ids = torch.randint(2, 512, (batch, 16))
    ids[:, -1] = 1  # the end token the tower pools at
    with torch.no_grad():
        image, text = model(torch.rand(batch, 3, 32, 32) * 2 - 1, ids)
        logits = model.logits(image, text)
    labels = torch.arange(batch)
    loss = ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).item()
    assert abs(loss - math.log(batch)) < 0.1 * math.log(batch)


def test_lm_weights_follow_llama_init() -> None:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=256, width=WIDTH, layers=2, heads=4, kv_heads=4, mlp_dim=128, qkv_bias=True,
                   initializer_range=0.05)  # fmt: skip
    lm = DecoderLM(cfg)
    for name, p in lm.named_parameters():
        if p.dim() == 2:  # every Linear and the embedding: N(0, initializer_range²)
            assert_std(p, 0.05, name)
    assert_zero_biases(lm)
    assert_identity_norms(lm)


def test_dual_encoder_weights_follow_open_clip_init() -> None:
    torch.manual_seed(0)
    model = tiny_clip()
    attn_std, fc_std = WIDTH**-0.5, (2 * WIDTH) ** -0.5
    proj_std = WIDTH**-0.5 * (2 * LAYERS) ** -0.5
    for tower in (model.visual, model.text):
        for block in tower.transformer.blocks:
            assert_std(block.attn.qkv.weight, attn_std, "qkv")
            assert_std(block.attn.out.weight, proj_std, "out")
            assert_std(block.mlp.fc1.weight, fc_std, "c_fc")
            assert_std(block.mlp.fc2.weight, proj_std, "c_proj")
        assert_std(tower.proj.weight, WIDTH**-0.5, "projection")
        assert_zero_biases(tower.transformer)
        assert_identity_norms(tower)
    assert_std(model.text.token_embed.weight, 0.02, "token embedding")
    assert_std(model.text.pos_embed, 0.01, "text positions")
    assert_std(model.visual.pos_embed, WIDTH**-0.5, "image positions")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-4)


def test_conv_stem_and_map_head_initialise() -> None:
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=4, width=WIDTH, layers=1, heads=4, mlp_dim=4 * WIDTH,
                       stem="conv", pool="map", class_token=False, embed_dim=None)  # fmt: skip
    tower = DualEncoder(
        DualEncoderConfig(cfg, TextConfig(vocab_size=64, width=WIDTH, heads=4, layers=1))
    ).visual
    last = tower.patch_embed.layers[-1]  # 1×1 conv to the width: Kaiming normal, fan_out = width
    assert_std(last.weight, math.sqrt(2 / WIDTH), "conv stem")
    assert torch.equal(last.bias, torch.zeros_like(last.bias))
    head = tower.head
    assert_std(head.attn.q.weight, math.sqrt(2 / (4 * WIDTH)), "MAP in-projection")  # Xavier of [3D, D]
    assert_std(head.attn.out.weight, WIDTH**-0.5, "MAP out-projection")  # LeCun normal
    assert_identity_norms(head)


def test_qformer_follows_blip2_init() -> None:
    torch.manual_seed(0)
    cfg = ConnectorConfig(
        kind="qformer", num_queries=64, width=WIDTH, depth=2, heads=4, initializer_range=0.03
    )
    connector = build_connector(cfg, vision_dim=WIDTH, lm_dim=WIDTH)
    for name, m in connector.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert_std(m.weight, 0.03, name)
    assert_std(connector.qformer.query_tokens, 0.03, "queries")  # LAVIS: N(0, initializer_range²), not zeros
    assert_zero_biases(connector)
    assert_identity_norms(connector)


@pytest.mark.parametrize("kind", ["linear", "mlp", "pixel_shuffle"])
def test_token_connectors_follow_transformers_init(kind: str) -> None:
    torch.manual_seed(0)
    connector = build_connector(ConnectorConfig(kind=kind, bias=True), vision_dim=WIDTH, lm_dim=WIDTH)
    for name, m in connector.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert_std(m.weight, 0.02, name)
    assert_zero_biases(connector)


def test_perceiver_and_gated_blocks_follow_idefics_init() -> None:
    torch.manual_seed(0)
    cfg = ConnectorConfig(kind="perceiver", num_queries=64, depth=2, heads=4)
    connector = build_connector(cfg, vision_dim=WIDTH, lm_dim=2 * WIDTH)
    for name, m in connector.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert_std(m.weight, 0.02, name)
    assert_std(connector.resampler.latents, 1.0, "latents")  # Idefics keeps them N(0, 1)
    assert_identity_norms(connector)
    block = GatedCrossAttentionBlock(WIDTH, WIDTH, heads=4, head_dim=16, mlp_dim=128)
    assert_std(block.attn.q.weight, 0.02, "gated q")
    assert_std(block.mlp.gate.weight, 0.02, "gated MLP")
    assert torch.equal(block.alpha_attn, torch.zeros(1)) and torch.equal(block.alpha_mlp, torch.zeros(1))
    assert_identity_norms(block)


def test_audio_tower_follows_whisper_init() -> None:
    torch.manual_seed(0)
    tower = AudioTower(AudioConfig(n_mels=16, width=WIDTH, layers=2, heads=4, mlp_dim=128, max_frames=8,
                                   init_std=0.04), embed_dim=WIDTH)  # fmt: skip
    for name, m in tower.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d) and m is not tower.proj:
            assert_std(m.weight, 0.04, name)
    assert_std(tower.proj.weight, WIDTH**-0.5, "projection")
    assert_zero_biases(tower.transformer)
    assert_identity_norms(tower)


def _no_random_init(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Stands for nn.init.normal_, which every recipe draws from: drawing into real memory fails the test (on the
    meta device, where loaders build, PyTorch's own default init is a free no-op)."""
    if not tensor.is_meta:
        raise AssertionError("a random init ran while loading a checkpoint")
    return tensor


@pytest.mark.parametrize("name", ["clip", "clap", "decoder_lm", "llava_vlm", "audio_encoder"])
def test_loading_an_mmlm_checkpoint_runs_no_init(name: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.nn.init, "normal_", _no_random_init)
    loaded = mmlm.load(str(FIXTURES / name))
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_loading_a_transformers_checkpoint_runs_no_init(tmp_path: Path, monkeypatch) -> None:
    reference = write_tiny_lm(tmp_path)
    monkeypatch.setattr(torch.nn.init, "normal_", _no_random_init)
    loaded = mmlm.load(str(tmp_path))
    torch.testing.assert_close(loaded.model.token_embed.weight, reference.model.embed_tokens.weight)
    assert loaded.model.cfg.initializer_range == reference.config.initializer_range


def test_fresh_model_runs_the_init_and_a_meta_one_does_not(monkeypatch) -> None:
    """The patch above catches mmlm's recipe (PyTorch's own Linear init draws no normal)."""
    monkeypatch.setattr(torch.nn.init, "normal_", _no_random_init)
    with pytest.raises(AssertionError, match="random init"):
        GatedCrossAttentionBlock(16, 16, heads=2, head_dim=8, mlp_dim=32)
    with torch.device("meta"):
        GatedCrossAttentionBlock(16, 16, heads=2, head_dim=8, mlp_dim=32)
