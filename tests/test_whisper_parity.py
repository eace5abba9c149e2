"""Whisper's audio encoder: parity with transformers' WhisperEncoder on tiny random models, mmlm.load of
Whisper folders, the key map's coverage, frame pooling and bad features."""

import json

import pytest
import torch
import transformers

import mmlm
from mmlm.checkpoints.hf_whisper import (
    audio_config_from_whisper,
    encoder_tensors,
    whisper_encoder_key_map,
)
from mmlm.checkpoints.keymap import to_ours, to_theirs
from mmlm.checkpoints.safetensors_io import read_weights, write_weights
from mmlm.errors import InputError
from mmlm.inference.audio import AudioModel
from mmlm.models.audio_encoder import AudioConfig, AudioEncoder, pool_frames, sinusoids

# (model class, WhisperConfig overrides): 80 and 128 mels, several widths/heads/depths, short inputs
CONFIGS = [
    ("WhisperModel", dict(num_mel_bins=80, d_model=64, encoder_attention_heads=4, encoder_layers=2,
                          encoder_ffn_dim=128, max_source_positions=1500)),
    ("WhisperForConditionalGeneration", dict(num_mel_bins=128, d_model=96, encoder_attention_heads=6,
                                             encoder_layers=3, encoder_ffn_dim=192, max_source_positions=200)),
    ("WhisperEncoder", dict(num_mel_bins=80, d_model=32, encoder_attention_heads=2, encoder_layers=1,
                            encoder_ffn_dim=48, max_source_positions=50, activation_function="gelu_new")),
]  # fmt: skip
TINY_DECODER = dict(
    vocab_size=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, max_target_positions=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
)  # fmt: skip


def write_tiny_whisper(folder, cls_name: str, overrides: dict, seed: int = 0):
    """Save a random transformers Whisper model (and its feature extractor) to `folder`; return its encoder."""
    torch.manual_seed(seed)
    hf_cfg = transformers.WhisperConfig(**TINY_DECODER, **overrides)
    cls = getattr(transformers.models.whisper.modeling_whisper, cls_name)
    model = cls(hf_cfg).eval()
    with torch.no_grad():  # random LayerNorms and biases, so a swapped norm or a dropped bias shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=hf_cfg.num_mel_bins).save_pretrained(folder)
    return model if cls_name == "WhisperEncoder" else model.get_encoder()


def random_features(cfg: AudioConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Return log-mel-like features [B, n_mels, 2·max_frames] (Whisper's features lie roughly in [-1, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.n_mels, cfg.input_frames, generator=g) * 2.5 - 1


@pytest.fixture(params=range(len(CONFIGS)), ids=[c[0] for c in CONFIGS], scope="module")
def whisper_folder(request, tmp_path_factory):
    cls_name, overrides = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(cls_name)
    encoder = write_tiny_whisper(folder, cls_name, overrides, seed=request.param)
    return folder, encoder, overrides


def test_encoder_matches_transformers(whisper_folder):
    folder, encoder, overrides = whisper_folder
    cfg = audio_config_from_whisper(json.loads((folder / "config.json").read_text()))
    assert (cfg.n_mels, cfg.width, cfg.heads, cfg.layers, cfg.max_frames) == (
        overrides["num_mel_bins"], overrides["d_model"], overrides["encoder_attention_heads"],
        overrides["encoder_layers"], overrides["max_source_positions"],
    )  # fmt: skip
    ours = AudioEncoder(cfg).eval()
    rules = whisper_encoder_key_map(cfg)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(to_ours(encoder_tensors(read_weights(folder), cfg, "test"), rules, shapes, "test"))
    features = random_features(cfg)
    with torch.no_grad():
        want = encoder(features).last_hidden_state
        got = ours(features)
    assert got.shape == (2, cfg.max_frames, cfg.width)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_load_folder_encodes_audio_like_transformers(whisper_folder, tmp_path):
    folder, encoder, _ = whisper_folder
    m = mmlm.load(folder)
    assert isinstance(m, AudioModel)
    features = random_features(m.config, batch=3, seed=2)
    with torch.no_grad():
        want = encoder(features).last_hidden_state
    torch.testing.assert_close(m.encode_audio(features), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_audio(features[0].numpy()), want[:1], atol=1e-5, rtol=0)
    # mmlm's own format round-trips the same numbers
    again = mmlm.load(m.save_pretrained(tmp_path / "mmlm"))
    assert again.config == m.config
    assert again.preprocessor["feature_size"] == m.config.n_mels
    torch.testing.assert_close(again.encode_audio(features), want, atol=1e-5, rtol=0)


def test_raw_audio_goes_through_whispers_log_mel(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    encoder = write_tiny_whisper(tmp_path, *CONFIGS[2])  # 50 positions: a 1 s window
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    extractor.save_pretrained(tmp_path)
    t = torch.arange(12000) / 16000
    clips = [(0.3 * torch.sin(2 * torch.pi * 440 * t)).numpy(), (0.1 * torch.randn(16000)).numpy()]
    want_features = torch.from_numpy(
        extractor(clips, sampling_rate=16000, return_tensors="np").input_features
    )
    with torch.no_grad():
        want = encoder(want_features).last_hidden_state
    m = mmlm.load(tmp_path)
    torch.testing.assert_close(m.features(clips), want_features, atol=1e-4, rtol=0)
    torch.testing.assert_close(m.encode_audio(clips), want, atol=1e-4, rtol=0)
    soundfile.write(tmp_path / "tone.wav", clips[0], 16000, subtype="FLOAT")
    torch.testing.assert_close(m.encode_audio(tmp_path / "tone.wav"), want[:1], atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="longer than the encoder's 1 s window"):
        m.encode_audio(torch.zeros(16001).numpy())


def test_key_map_covers_every_encoder_tensor_and_ignores_the_decoder(whisper_folder):
    folder, encoder, _ = whisper_folder
    weights = read_weights(folder)
    cfg = audio_config_from_whisper(json.loads((folder / "config.json").read_text()))
    rules = whisper_encoder_key_map(cfg)
    ours = AudioEncoder(cfg).state_dict()
    # every parameter and buffer of ours has exactly one rule ...
    assert sorted(o for r in rules for o in r.ours) == sorted(ours)
    # ... and the rules name every tensor of transformers' encoder, plus the k biases it lacks (loaded as zeros)
    theirs = {"encoder." + k for k in encoder.state_dict()}
    k_biases = {f"encoder.layers.{i}.self_attn.k_proj.bias" for i in range(cfg.layers)}
    assert set(to_theirs(ours, rules)) == theirs | k_biases
    assert not k_biases & theirs  # transformers' k_proj has no bias
    mapped = encoder_tensors(weights, cfg, "test")
    assert set(mapped) == theirs | k_biases
    assert all(not mapped[k].any() for k in k_biases)
    # a stray encoder tensor or a missing one is an error, never silently skipped
    prefix = next(k for k in weights if k.endswith("conv1.weight")).removesuffix("conv1.weight")
    stray = dict(weights, **{f"{prefix}extra.weight": torch.zeros(1)})
    shapes = {k: v.shape for k, v in ours.items()}
    with pytest.raises(InputError, match="no place in the model"):
        to_ours(encoder_tensors(stray, cfg, "test"), rules, shapes, "test")
    missing = {k: v for k, v in weights.items() if not k.endswith("fc2.bias")}
    with pytest.raises(InputError, match="missing"):
        to_ours(encoder_tensors(missing, cfg, "test"), rules, shapes, "test")


def test_folder_without_encoder_is_an_input_error(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "whisper", "architectures": ["WhisperModel"]})
    )
    write_weights({"decoder.layer_norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="no Whisper encoder tensors"):
        mmlm.load(tmp_path)


def test_mismatched_preprocessor_is_an_input_error(tmp_path):
    write_tiny_whisper(tmp_path, *CONFIGS[2])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_size": 128}))
    with pytest.raises(InputError, match="feature_size 128"):
        mmlm.load(tmp_path)


def test_sinusoids_are_whispers():
    pos = sinusoids(1500, 384)
    assert pos.shape == (1500, 384)
    # position 0: sin 0 = 0 on the first half, cos 0 = 1 on the second; channel 0 has timescale 1
    assert torch.equal(pos[0], torch.cat([torch.zeros(192), torch.ones(192)]))
    torch.testing.assert_close(pos[:, 0], torch.arange(1500.0).sin())
    torch.testing.assert_close(pos[:, 191], (torch.arange(1500.0) / 10000).sin())


def test_pool_frames_mean_and_stack():
    states = torch.arange(2 * 1500 * 3, dtype=torch.float32).reshape(2, 1500, 3)
    mean = pool_frames(states, 4)
    assert mean.shape == (2, 375, 3)
    torch.testing.assert_close(mean[:, 0], states[:, :4].mean(1))
    stacked = pool_frames(states, 4, mode="stack")
    assert stacked.shape == (2, 375, 12)
    # frame-major: frame 4j's D channels first, then frame 4j+1's, ...
    assert torch.equal(stacked[1, 2], states[1, 8:12].reshape(-1))
    with pytest.raises(ValueError, match="must divide"):
        pool_frames(states, 7)
    with pytest.raises(ValueError, match="unknown frame pooling"):
        pool_frames(states, 4, mode="max")


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 64, 100), "64 mel bins, the model expects 80"), ((1, 80, 3000), "3000 frames, the model expects 100"),
     ((1, 1, 80, 100), "\\[batch, 80 mels, 100 frames\\]")],
)  # fmt: skip
def test_bad_features_are_one_line_input_errors(shape, match):
    cfg = AudioConfig(n_mels=80, width=32, layers=1, heads=2, mlp_dim=48, max_frames=50)
    model = AudioModel(AudioEncoder(cfg).eval())
    with pytest.raises(InputError, match=match) as err:
        model.encode_audio(torch.zeros(shape))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="log-mel features"):
        model.encode_audio([0.0, 0.1])
