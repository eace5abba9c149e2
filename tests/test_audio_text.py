"""Audio-text contrastive models (CLAP-style): encode_audio, save/load, training, similarity and retrieval CLIs,
bad audio input. Tones of four pitches stand in for spoken words, so the tests need no synthesiser."""

import json

import numpy as np
import pytest
import soundfile
import torch

import mmlm
from mmlm.errors import InputError
from mmlm.train.config import load_train_config
from mmlm.train.run import run_clip_training
from system_programs import needs_program

RATE = 16_000
PITCHES = {"low": 200.0, "middle": 500.0, "high": 1250.0, "top": 3000.0}
TINY_AUDIO = [
    "model.audio.n_mels=32", "model.audio.width=32", "model.audio.layers=1", "model.audio.heads=2",
    "model.audio.mlp_dim=64", "model.audio.max_frames=25", "model.audio_embed_dim=16", "model.text.width=16",
    "model.text.layers=1", "model.text.heads=2", "model.text.mlp_dim=32", "model.text.embed_dim=16",
    "model.text.context_length=8", "vocab_size=270", "batch_size=8", "log_every=1", "optim.warmup_steps=5",
    "optim.lr=3e-3",
]  # fmt: skip


def write_tone_set(folder, clips_per_word=6, seed=0):
    """Write 0.3 s tones (random phase, gain and noise) named by pitch; the last clip of each word is test."""
    rng = np.random.default_rng(seed)
    rows = []
    for word, hertz in PITCHES.items():
        for k in range(clips_per_word):
            t = np.arange(int(0.3 * RATE)) / RATE
            tone = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * hertz * t + rng.uniform(0, 6.3))
            samples = (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
            split = "test" if k == clips_per_word - 1 else "train"
            path = folder / split / f"{word}_{k}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(path, samples, RATE)
            rows.append({"audio": f"{split}/{word}_{k}.wav", "text": word, "split": split})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "manifest.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny audio-text CLIP trained 60 steps on the tones' train split: (loaded model, records, folder)."""
    root = tmp_path_factory.mktemp("audio_text")
    manifest = write_tone_set(root / "data")
    cfg = load_train_config(
        None,
        [
            *TINY_AUDIO,
            "steps=60",
            f"data.source={manifest}",
            "data.split=train",
            f"out_dir={root / 'run'}",
            f"val_data={manifest}",
            "val_split=test",
        ],  # fmt: skip
    )
    loaded, records = run_clip_training(cfg)
    return loaded, records, root


def test_training_lowers_the_loss_and_retrieves_held_out_tones(trained):
    from mmlm.eval.retrieval import read_audio_retrieval_set, retrieval_metrics

    loaded, records, root = trained
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-10:]])
    assert last < 0.5 * first
    clips, texts, text_to_clip = read_audio_retrieval_set(str(root / "data" / "manifest.jsonl"), split="test")
    metrics = retrieval_metrics(
        loaded.encode_audio(clips), loaded.encode_text(texts), text_to_clip, modality="audio"
    )
    assert metrics["audio_to_text_R@1"] >= 0.75 and metrics["text_to_audio_R@1"] >= 0.75  # chance: 0.25
    assert "image_to_text_R@1" not in metrics
    assert records[-1]["audio_to_text_R@1"] == pytest.approx(
        metrics["audio_to_text_R@1"]
    )  # the val_data hook


def test_encode_audio_is_unit_norm_and_independent_of_the_batch(trained):
    loaded, _, root = trained
    clips = sorted((root / "data" / "test").glob("*.wav"))
    emb = loaded.encode_audio(clips, batch_size=3)
    assert emb.shape == (4, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    one_by_one = torch.cat([loaded.encode_audio(str(c)) for c in clips])
    torch.testing.assert_close(emb, one_by_one, atol=1e-5, rtol=0)
    samples = soundfile.read(clips[0], dtype="float32")[0]
    torch.testing.assert_close(loaded.encode_audio([samples], sampling_rate=RATE), emb[:1], atol=1e-5, rtol=0)


def test_save_and_load_round_trip_gives_identical_embeddings(trained, tmp_path):
    loaded, _, root = trained
    folder = loaded.save_pretrained(tmp_path / "model")  # auto: transformers has no Whisper-tower CLAP
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "dual_encoder" and "mmlm_version" in config
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert (
        preprocessor["feature_extractor_type"] == "WhisperFeatureExtractor"
        and preprocessor["feature_size"] == 32
    )
    again = mmlm.load(folder)
    clips = sorted((root / "data" / "test").glob("*.wav"))
    assert torch.equal(again.encode_audio(clips), loaded.encode_audio(clips))
    assert torch.equal(again.encode_text(list(PITCHES)), loaded.encode_text(list(PITCHES)))
    assert again.modality == "audio" and again.image_processor is None


def test_similarity_cli_scores_clips_against_texts(trained, capsys):
    from mmlm.cli import main

    _, _, root = trained
    low, top = root / "data" / "test" / "low_5.wav", root / "data" / "test" / "top_5.wav"
    model = root / "run" / "model"
    argv = ["similarity", "--model", str(model), "--audio", str(low), "--audio", str(top)]
    assert main([*argv, "--text", "low", "--text", "top", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["audio"] for r in rows] == [str(low), str(top)]
    assert rows[0]["scores"]["low"] > 0.5 > rows[1]["scores"]["low"]
    assert sum(rows[1]["scores"].values()) == pytest.approx(1.0, abs=1e-5)  # softmax over the texts
    assert main([*argv, "--text", "low"]) == 0
    assert "low_5.wav" in capsys.readouterr().out
    classify = [
        "classify",
        "--model",
        str(model),
        "--audio",
        str(low),
        "--audio",
        str(top),
        "--labels",
        "low,top",
    ]
    assert main([*classify, "--templates", str(_templates(root)), "--json"]) == 0
    assert [(r["audio"], r["label"]) for r in json.loads(capsys.readouterr().out)] == [
        (str(low), "low"),
        (str(top), "top"),
    ]


def _templates(root):
    path = root / "templates.txt"
    path.write_text("{}\n")  # the bare label, as the tones were captioned
    return path


def test_eval_retrieval_reads_an_audio_manifest(trained, capsys):
    from mmlm.cli import main
    from mmlm.eval.retrieval import read_audio_retrieval_set, retrieval_metrics

    loaded, _, root = trained
    manifest = str(root / "data" / "manifest.jsonl")
    argv = [
        "eval",
        "retrieval",
        "--model",
        str(root / "run" / "model"),
        "--data",
        manifest,
        "--split",
        "test",
    ]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_audio"] == 4 and result["num_texts"] == 4 and "image_to_text_R@1" not in result
    clips, texts, text_to_clip = read_audio_retrieval_set(manifest, split="test")
    expected = retrieval_metrics(
        loaded.encode_audio(clips), loaded.encode_text(texts), text_to_clip, modality="audio"
    )
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    assert result["audio_to_text_R@1"] >= 0.75 and result["text_to_audio_R@1"] >= 0.75
    assert main(argv) == 0
    assert "audio_to_text" in capsys.readouterr().out


def test_bad_audio_input_is_one_line_naming_the_file(trained, tmp_path):
    loaded, _, _ = trained
    with pytest.raises(InputError, match="missing.wav"):
        loaded.encode_audio([str(tmp_path / "missing.wav")])
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(InputError, match="corrupt.wav"):
        loaded.encode_audio([corrupt])
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(RATE, dtype=np.float32), RATE)  # 1 s; the tower's window is 0.5 s
    with pytest.raises(InputError, match=r"long.wav.*longer than the encoder's 0.5 s window"):
        loaded.encode_audio([long])
    with pytest.raises(InputError, match="audio-text model; it cannot encode image"):
        loaded.encode_image([long])


def test_cli_refuses_audio_for_an_image_model_and_images_for_an_audio_model(trained, tmp_path, capsys):
    from fixtures_models import write_tiny_clip
    from mmlm.cli import main

    _, _, root = trained
    write_tiny_clip(tmp_path / "clip")
    capsys.readouterr()  # transformers' own progress output while writing the fixture
    clip = str(root / "data" / "test" / "low_5.wav")
    assert main(["similarity", "--model", str(tmp_path / "clip"), "--audio", clip, "--text", "low"]) == 2
    err = capsys.readouterr().err
    assert "--audio given" in err and "image-text model" in err and len(err.strip().splitlines()) == 1
    assert main(["similarity", "--model", str(root / "run" / "model"), "--image", clip, "--text", "low"]) == 2
    assert "--image given" in capsys.readouterr().err
    manifest = str(root / "data" / "manifest.jsonl")
    assert main(["eval", "retrieval", "--model", str(tmp_path / "clip"), "--data", manifest]) == 2
    assert "audio-text pairs" in capsys.readouterr().err


def test_lock_image_freezes_the_audio_tower(tmp_path):
    from mmlm.models.dual_encoder import DualEncoder

    manifest = write_tone_set(tmp_path / "data", clips_per_word=2)
    cfg = load_train_config(
        None,
        [*TINY_AUDIO, "steps=2", f"data.source={manifest}", f"out_dir={tmp_path / 'run'}", "lock_image=0"],
    )
    torch.manual_seed(cfg.seed)
    before = {k: v.clone() for k, v in DualEncoder(cfg.model).audio.state_dict().items()}
    loaded, _ = run_clip_training(cfg)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.audio.state_dict().items())
    assert loaded.model.logit_scale.item() != pytest.approx(cfg.model.logit_scale_init)  # the rest trained


def test_lock_image_n_keeps_the_audio_stem_frozen_and_the_last_blocks_and_head_trainable():
    from mmlm.models.audio_encoder import AudioConfig
    from mmlm.models.audio_tower import AudioTower
    from mmlm.train.optim import lock_tower

    tower = AudioTower(
        AudioConfig(n_mels=8, width=16, layers=3, heads=2, mlp_dim=32, max_frames=10), "map", 8
    )
    lock_tower(tower, 1)
    trainable = {name.split(".")[0] + ("." + name.split(".")[2] if name.startswith("transformer") else "")
                 for name, p in tower.named_parameters() if p.requires_grad}  # fmt: skip
    assert trainable == {"transformer.2", "norm_post", "attn_pool", "proj"}  # not conv1/conv2, not blocks 0-1


def test_an_audio_model_trains_only_on_an_audio_manifest_with_matching_settings(tmp_path):
    cfg = load_train_config(None, [*TINY_AUDIO, "steps=1", f"out_dir={tmp_path}"])
    with pytest.raises(InputError, match="audio manifest"):
        run_clip_training(cfg)
    with pytest.raises(InputError, match=r"audio_embed_dim \(12\) must equal model.text.embed_dim \(16\)"):
        load_train_config(None, [*TINY_AUDIO, "model.audio_embed_dim=12"])
    with pytest.raises(InputError, match="audio_pool: got 'max'"):
        load_train_config(None, [*TINY_AUDIO, "model.audio_pool=max"])


@needs_program("espeak-ng", "espeak-ng")
def test_audio_demo_runs_end_to_end_on_a_few_spoken_words(tmp_path):
    from mmlm.recipes.demo_audio import run_audio_demo

    summary = run_audio_demo(
        tmp_path, steps=3, variants_per_phrase=2, phrases=["red", "blue", "circle"], width=32, vlm_steps=2
    )
    assert summary["test_clips"] == 3 and summary["chance_R@1"] == pytest.approx(1 / 3)
    assert 0 <= summary["audio_to_text_R@1"] <= 1 and summary["steps"] == 3
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    clap = mmlm.load(tmp_path / "train" / "model")
    assert clap.modality == "audio"
    vlm = mmlm.load(tmp_path / "vlm")  # the spoken-word VLM, on the CLIP's audio tower (frozen)
    assert 0 <= summary["vlm_accuracy"] <= 1 and summary["vlm_steps"] == 2
    features = torch.randn(1, 80, 200)
    with torch.no_grad():
        want = super(type(clap.model.audio), clap.model.audio).forward(
            features
        )  # the encoder, before pooling
        torch.testing.assert_close(vlm.model.audio(features), want)
