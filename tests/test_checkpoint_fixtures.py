"""Checkpoints written by older mmlm (tests/fixtures/checkpoints, see make_checkpoints.py) load with today's
`mmlm.load` and give the outputs they gave when they were written."""

import json
from pathlib import Path

import pytest
import torch
from fixtures.make_checkpoints import (
    HERE,
    LM_PROMPTS,
    RATE,
    TEXTS,
    VLM_PROMPT,
    fixed_clips,
    fixed_images,
    lm_batch,
)

import mmlm
from mmlm.inference.audio import AudioModel
from mmlm.inference.causal_lm import CausalLM
from mmlm.inference.contrastive import ContrastiveModel
from mmlm.inference.vlm import GenerativeModel

# The fixture's numbers were computed on one CPU thread of an AMD EPYC machine; there, on one thread, today's
# code gives them to the last bit. Another CPU picks other MKL/oneDNN kernels: on an Intel Xeon the outputs
# differ by up to 4.9e-6 (CLAP's logits, which exp(logit_scale) scales up) and 1.4e-6 (LM logits). A loading
# mistake (a wrong or missing weight, a changed default) moves them by orders of magnitude more.
TOLERANCE = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread, as the fixture was written: several threads may sum in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(name: str) -> tuple[object, dict]:
    """Return (today's mmlm.load of the fixture folder `name`, the outputs it gave when it was written)."""
    folder = HERE / name
    return mmlm.load(folder), json.loads((folder / "expected.json").read_text())


def assert_same(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected), **TOLERANCE)


def test_clip_image_text():
    stored = json.loads((HERE / "clip" / "config.json").read_text())["config"]
    # written before the vision and text configs carried a version: they read as version 1
    assert "version" not in stored["vision"] and "version" not in stored["text"]
    loaded, expected = load("clip")
    assert loaded.config.vision.version == loaded.config.text.version == 1
    assert isinstance(loaded, ContrastiveModel) and loaded.modality == "image"
    image, text = loaded.encode_image(fixed_images()), loaded.encode_text(TEXTS)
    assert_same(image, expected["image_embeds"])
    assert_same(text, expected["text_embeds"])
    assert_same(loaded.logits(image, text), expected["logits"])


def test_clap_audio_text():
    loaded, expected = load("clap")
    assert isinstance(loaded, ContrastiveModel) and loaded.modality == "audio"
    audio, text = loaded.encode_audio(fixed_clips(), sampling_rate=RATE), loaded.encode_text(TEXTS)
    assert_same(audio, expected["audio_embeds"])
    assert_same(text, expected["text_embeds"])
    assert_same(loaded.logits(audio, text), expected["logits"])


def test_decoder_lm():
    loaded, expected = load("decoder_lm")
    assert isinstance(loaded, CausalLM)
    ids, mask = lm_batch(loaded.config.vocab_size)
    with torch.no_grad():
        logits = loaded.model(ids, attention_mask=mask).logits
    assert_same(logits[:, -1], expected["last_logits"])
    assert logits.argmax(-1).tolist() == expected["argmax"]
    assert [loaded.generate(p, max_new_tokens=8) for p in LM_PROMPTS] == expected["generated"]


def test_mlp_connector_vlm():
    loaded, expected = load("llava_vlm")
    assert isinstance(loaded, GenerativeModel) and loaded.config.connector.kind == "mlp"
    images = fixed_images()
    batch = loaded.processor(VLM_PROMPT, images[:1])
    assert batch["input_ids"].tolist() == expected["input_ids"]
    with torch.no_grad():
        logits = loaded.model(batch["input_ids"], batch["pixel_values"]).logits
    assert_same(logits[0, -4:], expected["last_logits"])
    assert logits.argmax(-1).tolist() == expected["argmax"]
    assert loaded.generate_tokens(VLM_PROMPT, images[1:2], max_new_tokens=8) == expected["greedy_tokens"]


def test_audio_encoder():
    loaded, expected = load("audio_encoder")
    assert isinstance(loaded, AudioModel)
    assert_same(loaded.encode_audio(fixed_clips(), sampling_rate=RATE), expected["states"])


@pytest.mark.parametrize("name", ["clip", "clap", "decoder_lm", "llava_vlm", "audio_encoder"])
def test_fixture_folders_stay_small(name):
    size = sum(f.stat().st_size for f in Path(HERE / name).iterdir())
    assert size < 400_000, f"{name}: {size} bytes; the fixture is meant to stay tiny"
