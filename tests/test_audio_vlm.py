"""Audio in the LM: `<audio>` becomes exactly the audio connector's tokens, filled from a Whisper-style tower,
through the processor, the trainer, generation, checkpoints and `mmlm chat --audio`."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile
import torch

import mmlm
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.vlm import VisionLanguageModel
from mmlm.train.vlm_config import vlm_config_from_dict
from mmlm.train.vlm_loop import run_vlm_training

RATE = 16000
TINY_AUDIO = {
    "n_mels": 80,
    "width": 32,
    "layers": 1,
    "heads": 2,
    "mlp_dim": 64,
    "max_frames": 50,
}  # a 1 s window


def tone(hertz: float, seconds: float = 0.6, seed: int = 0) -> np.ndarray:
    """A sine with a little noise, so no two clips are the same."""
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).standard_normal(len(t)) * 0.01
    return (0.4 * np.sin(2 * np.pi * hertz * t) + noise).astype(np.float32)


def write_pitch_set(folder, clips: int = 48) -> str:
    """Conversations asking whether a tone is high (2 kHz) or low (300 Hz), with the clips as WAV files."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(clips):
        answer = "high" if i % 2 else "low"
        soundfile.write(folder / f"clip{i}.wav", tone(2000 if i % 2 else 300, seed=i), RATE)
        records.append({"id": i, "audio": f"clip{i}.wav", "conversations": [
            {"from": "human", "value": "<audio>\nIs the tone high or low?"}, {"from": "gpt", "value": answer}]})  # fmt: skip
    (folder / "pitch.json").write_text(json.dumps(records))
    return str(folder / "pitch.json")


def run_config(out, data: str, steps: int = 2, train=("connector", "lm", "audio"), **audio_parts):
    model = {
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        "lm": {"width": 48, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 96},
        "vocab_size": 300, "audio": TINY_AUDIO, "audio_pool": 5, **audio_parts,
    }  # fmt: skip
    stages = {"train": {"steps": steps, "train": list(train),
                        "data": {"source": data, "multimodal_fraction": 1.0},
                        "optim": {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 5}}}  # fmt: skip
    return vlm_config_from_dict({"model": model, "stages": stages, "batch_size": 8, "max_length": 64,
                                 "log_every": 1, "eval_samples": 0, "out_dir": str(out), "device": "cpu"})  # fmt: skip


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)


@pytest.fixture(scope="module")
def pitch_data(tmp_path_factory) -> str:
    return write_pitch_set(tmp_path_factory.mktemp("pitch"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pitch_data):
    """A tiny audio VLM trained to tell high tones from low ones."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
        patch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)
        loaded, records = run_vlm_training(run_config(out, pitch_data, steps=120))
    return loaded, records, out


def test_an_audio_placeholder_becomes_the_connectors_tokens(trained):
    loaded, _, _ = trained
    processor, model = loaded.processor, loaded.model
    assert model.audio_tokens == processor.tokens_per_audio == TINY_AUDIO["max_frames"] // 5
    sample = processor.encode("<audio> and <audio>?", audio=[tone(300), tone(2000)])
    assert int((sample.input_ids == model.cfg.audio_token_id).sum()) == 2 * model.audio_tokens
    assert sample.audio_features.shape == (2, 80, 2 * TINY_AUDIO["max_frames"])
    assert bool((sample.labels[sample.input_ids == model.cfg.audio_token_id] == -100).all())


@pytest.mark.parametrize(
    ("connector", "mode", "tokens"),
    [({"kind": "mlp"}, "stack", 10), ({"kind": "qformer", "num_queries": 3, "depth": 1, "heads": 2}, "mean", 3),
     ({"kind": "perceiver", "num_queries": 4, "depth": 1, "heads": 2}, "mean", 4)],
)  # fmt: skip
def test_any_token_connector_fills_the_audio_slots(trained, connector, mode, tokens):
    cfg = dataclasses.replace(
        trained[0].config, audio_connector=ConnectorConfig(**connector), audio_pool_mode=mode
    )
    model = VisionLanguageModel(cfg).eval()
    assert model.audio_tokens == tokens
    features = torch.randn(2, 80, 100)
    ids = torch.tensor([[1] + [cfg.audio_token_id] * tokens + [5, cfg.audio_token_id] + [7] * (tokens - 1)])
    ids = torch.cat([ids[:, : 2 + tokens], torch.full((1, tokens), cfg.audio_token_id), ids[:, -1:]], 1)
    with torch.no_grad():
        embeds, _ = model.prepare(ids, None, features)
        want = model.audio_embeddings(features)  # [2, tokens, D]
    slots = ids[0] == cfg.audio_token_id
    torch.testing.assert_close(embeds[0, slots], want.flatten(0, 1))
    torch.testing.assert_close(embeds[0, ~slots], model.lm.embed(ids[:, ~slots])[0])


def test_training_learns_to_hear_the_pitch(trained, tmp_path):
    loaded, records, _ = trained
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert (
        records[-1]["loss_audio"] == records[-1]["loss"] and "loss_image" not in records[-1]
    )  # audio rows only
    question = [{"role": "user", "content": "<audio>\nIs the tone high or low?"}]
    answers = loaded.generate([question] * 4, audio=[[tone(h, seed=100 + i)] for i, h in
                              enumerate((300, 2000, 310, 1900))], max_new_tokens=3)  # fmt: skip
    assert [a.strip() for a in answers] == ["low", "high", "low", "high"]


def test_paths_arrays_messages_and_batches_agree(trained, tmp_path):
    loaded, _, _ = trained
    clip = tone(2000, seed=7)
    soundfile.write(tmp_path / "c.wav", clip, RATE, subtype="FLOAT")
    prompt = "<audio>\nIs the tone high or low?"
    from_array = loaded.generate(prompt, audio=[clip], max_new_tokens=4)
    assert loaded.generate(prompt, audio=str(tmp_path / "c.wav"), max_new_tokens=4) == from_array
    at_8k = clip[::2].copy()  # the same tone at 8 kHz, resampled back up
    assert loaded.generate(prompt, audio=[at_8k], sampling_rate=8000, max_new_tokens=4) == from_array
    batch = loaded.generate([prompt, "Say it: <audio>"], audio=[[clip], [tone(300)]], max_new_tokens=4)
    assert batch[0] == from_array
    assert batch[1] == loaded.generate("Say it: <audio>", audio=[tone(300)], max_new_tokens=4)
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "hi"}]}
    ]
    assert loaded.processor.encode(messages, add_generation_prompt=True).audio_features.shape[0] == 1
    assert "".join(loaded.stream(messages, max_new_tokens=4)) == loaded.generate(messages, max_new_tokens=4)


def test_the_checkpoint_round_trips_in_mmlm_format(trained, tmp_path):
    loaded, _, out = trained
    saved = json.loads((out / "model" / "config.json").read_text())
    assert (
        saved["architecture"] == "vlm" and saved["config"]["audio"]["max_frames"] == TINY_AUDIO["max_frames"]
    )
    again = mmlm.load(out / "model")
    prompt, clip = "<audio>\nIs the tone high or low?", [tone(300, seed=3)]
    batch = loaded.processor(prompt, audio=clip)
    with torch.no_grad():
        want = loaded.model(batch["input_ids"], audio_features=batch["audio_features"]).logits
        got = again.model(batch["input_ids"], audio_features=batch["audio_features"]).logits
    torch.testing.assert_close(got, want)
    assert again.generate(prompt, audio=clip, max_new_tokens=3) == loaded.generate(
        prompt, audio=clip, max_new_tokens=3
    )


def test_chat_cli_takes_audio(trained, tmp_path, capsys):
    loaded, _, out = trained
    soundfile.write(tmp_path / "high.wav", tone(2000, seed=11), RATE)
    assert main(["chat", "--model", str(out / "model"), "--audio", str(tmp_path / "high.wav"), "--max-new-tokens",
                 "3", "Is the tone high or low?"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == loaded.generate(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Is the tone high or low?"}]}],
        audio=[str(tmp_path / "high.wav")], max_new_tokens=3).strip()  # fmt: skip


def test_bad_audio_inputs_are_one_line_errors(trained, tmp_path, capsys):
    loaded, _, out = trained
    cases = [
        (lambda: loaded.generate("<audio> <audio>", audio=[tone(300)]), "1 clip\\(s\\) for 2 <audio>"),
        (lambda: loaded.generate("no slot", audio=[tone(300)]), "1 clip\\(s\\) for 0 <audio>"),
        (lambda: loaded.generate("<audio>", audio=[tone(300, seconds=1.5)]), "longer than the encoder's 1 s window"),
        (lambda: loaded.generate("<audio>", audio=[np.zeros(0, np.float32)]), "contains no audio samples"),
        (lambda: loaded.generate("<audio>", audio=[str(tmp_path / "missing.wav")]), "not found"),
    ]  # fmt: skip
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(40))
    cases.append((lambda: loaded.generate("<audio>", audio=[str(tmp_path / "corrupt.wav")]), "corrupt.wav"))
    for call, match in cases:
        with pytest.raises(InputError, match=match) as error:
            call()
        assert "\n" not in str(error.value)
    assert main(["chat", "--model", str(out / "model"), "--audio", str(tmp_path / "missing.wav"), "hi"]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_audio_settings_are_checked(trained):
    cfg = trained[0].config
    for change, match in [
        ({"audio_pool": 7}, "audio_pool: 7 must divide"),
        ({"audio_pool_mode": "max"}, "audio_pool_mode"),
        ({"audio_connector": ConnectorConfig(kind="pixel_shuffle")}, "audio_connector.kind"),
        ({"audio_token_id": None}, "audio_token_id"),
    ]:
        with pytest.raises(InputError, match=match):
            VisionLanguageModel(dataclasses.replace(cfg, **change))


def test_a_model_without_audio_refuses_it(tmp_path, capsys):
    from fixtures_vlm import write_tiny_llava

    write_tiny_llava(tmp_path)
    m = mmlm.load(tmp_path)
    with pytest.raises(InputError, match="no audio tower"):
        m.generate("<image> hi", images=[np.zeros((32, 32, 3), np.uint8)], audio=[tone(300)])
    soundfile.write(tmp_path / "a.wav", tone(300), RATE)
    assert main(["chat", "--model", str(tmp_path), "--audio", str(tmp_path / "a.wav"), "hi"]) == 2
    assert "has no audio tower" in capsys.readouterr().err


def test_a_whisper_folder_initialises_the_audio_tower(tmp_path, pitch_data):
    from test_whisper_parity import write_tiny_whisper

    overrides = dict(num_mel_bins=80, d_model=32, encoder_attention_heads=2, encoder_layers=1, encoder_ffn_dim=64,
                     max_source_positions=50)  # fmt: skip
    encoder = write_tiny_whisper(tmp_path / "whisper", "WhisperModel", overrides)
    cfg = run_config(tmp_path / "run", pitch_data, steps=1, train=["connector"], audio_init=str(tmp_path / "whisper"),
                     audio=None)  # fmt: skip
    loaded, _ = run_vlm_training(cfg)
    features = torch.randn(1, 80, 100)
    with torch.no_grad():
        want = encoder(features).last_hidden_state
        torch.testing.assert_close(
            loaded.model.audio(features), want, atol=1e-5, rtol=0
        )  # frozen: Whisper's own
    cfg.model.audio_init = str(tmp_path / "run" / "model")  # a VLM, not an audio encoder
    with pytest.raises(InputError, match="not an audio encoder"):
        run_vlm_training(cfg)


def test_the_server_takes_input_audio_parts(trained, tmp_path):
    import base64
    import io

    import httpx
    from test_serve_api import KEY, assert_error, serving

    from mmlm.serve.engine import Engine, EngineConfig

    loaded, _, _ = trained
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(2000, seed=21), RATE, format="WAV")
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(), "format": "wav"},
    }
    question = {"type": "text", "text": "Is the tone high or low?"}
    engine = Engine(vlm=loaded, config=EngineConfig(max_queue=4, max_batch=2))
    with serving(engine, model_id="tiny-audio", api_key=KEY) as url:

        def chat(content) -> httpx.Response:
            body = {"model": "tiny-audio", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
                    "temperature": 0}  # fmt: skip
            return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60)  # fmt: skip

        reply = chat([audio, question])
        assert reply.status_code == 200, reply.text
        expected = loaded.generate([{"role": "user", "content": [{"type": "audio"}, question]}],
                                   audio=[buffer.getvalue()], max_new_tokens=3)  # fmt: skip
        assert reply.json()["choices"][0]["message"]["content"] == expected
        assert reply.json()["usage"]["prompt_tokens"] > loaded.model.audio_tokens
        bad = {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}
        assert_error(chat([bad, question]), 400, param="messages.0.content.0.input_audio.data")
        corrupt = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + bytes(40)).decode(),
                                                          "format": "wav"}}  # fmt: skip
        assert_error(chat([corrupt, question]), 400)


def test_eval_vlm_scores_audio_samples_with_blind_and_shuffled_probes(trained, tmp_path, capsys):
    loaded, _, out = trained
    rows = []
    for i, hertz in enumerate([300, 2000, 320, 1900, 280, 2100]):
        soundfile.write(tmp_path / f"t{i}.wav", tone(hertz, seed=300 + i), RATE)
        answer = "high" if hertz > 1000 else "low"
        rows.append(
            {"id": f"t{i}", "question": "Is the tone high or low?", "audio": f"t{i}.wav", "answers": [answer]}
        )
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"data": "samples.jsonl", "prompt": "{question}", "parser": "vqa", "metric": "exact_match"}
    (tmp_path / "pitch.json").write_text(json.dumps(task))
    argv = ["eval", "vlm", "--model", str(out / "model"), "--tasks", str(tmp_path / "pitch.json"), "--blind",
            "--shuffled", "--out", str(tmp_path / "eval"), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)["tasks"][0]
    scores = {probe: r["metrics"]["exact_match"] for probe, r in result["probes"].items()}
    assert scores["normal"] == 1.0 and scores["blind"] <= 0.5  # silence cannot tell high from low
    assert result["gain"]["all"] == scores["normal"] - scores["blind"]
    assert "<audio>" in result["example_model_input"]
    assert main(argv) == 0  # the second run answers from the generation cache
    assert json.loads(capsys.readouterr().out)["tasks"][0]["generations"] == {"generated": 0, "cached": 18}


def test_only_mmlm_backends_take_audio_and_video():
    from mmlm.eval.backends import Audio, OpenAIBackend, Video, images_only

    images_only([[], []], "any")  # text-only and image prompts pass
    for item in (Audio("a.wav"), Video("v.mp4")):
        with pytest.raises(InputError, match="audio and video samples need an mmlm model"):
            images_only([[item]], "openai:http://x")
    backend = OpenAIBackend.__new__(OpenAIBackend)
    backend.name = "openai:http://x"
    with pytest.raises(InputError, match="need an mmlm model"):
        backend.generate(["q"], [[Audio("a.wav")]], 4)
