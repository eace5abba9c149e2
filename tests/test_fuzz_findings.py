"""Inputs the fuzzers (tests/test_fuzz.py, benchmarks/fuzz.py) found giving another exception than InputError
or a 5xx; each is now refused at its boundary with one line."""

import io
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from fixtures_fuzz import apply_mutations, audio_seeds, video_seeds
from mmlm.data.conversations import read_conversations
from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows
from mmlm.processing.audio import load_audio
from mmlm.processing.image import load_image
from mmlm.processing.video import read_video
from mmlm.serve.app import create_app
from mmlm.serve.config import ServeConfig


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"image": "a.png", "text": ' + "9" * 5_000 + "}", "invalid JSON"),
    ],
)
def test_json_nested_too_deeply_or_with_a_huge_integer_is_an_input_error(tmp_path, text, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        list(jsonl_rows(path))
    (tmp_path / "conversations.json").write_text(text if text.startswith("[") else f"[{text}]")
    with pytest.raises(InputError, match=message):
        read_conversations(tmp_path / "conversations.json")


def app_client():
    """A TestClient over the server app with an engine that is never reached (bodies fail before it)."""
    engine = SimpleNamespace(vlm=None, embedder=None, index=None)
    return TestClient(create_app(engine, ServeConfig()), raise_server_exceptions=False)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
        + b"9" * 5_000
        + b"}",
    ],
)
def test_a_body_nested_too_deeply_or_with_a_huge_integer_is_a_400(body):
    response = app_client().post("/v1/chat/completions", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


def test_a_wav_whose_header_names_a_codec_ffmpeg_cannot_decode_is_an_input_error():
    # the bits-per-sample field overwritten: libsndfile refuses the file, FFmpeg opens a stream with no decoder
    damaged = apply_mutations(audio_seeds()["wav_float_stereo"], [("size_le", 35, 258599711)])
    with pytest.raises(InputError, match="no decoder"):
        load_audio(damaged)


def test_a_video_whose_metadata_is_not_utf8_is_an_input_error():
    damaged = apply_mutations(video_seeds()["mp4"], [("size_le", 16, 1567932877)])
    with pytest.raises(InputError, match="not a readable video"):
        read_video(damaged, num_frames=2)


def test_a_png_with_a_short_header_chunk_is_an_input_error():
    short_header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 4) + b"IHDR" + b"\0\0\0\x10" + b"\0" * 4
    with pytest.raises(InputError, match="not a readable image"):
        load_image(short_header)


def test_text_with_a_lone_surrogate_is_a_400():
    body = b'{"model": "mmlm", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    parts = (
        b'{"model": "mmlm", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
    )
    client = TestClient(create_app(SimpleNamespace(vlm=object(), embedder=None, index=None), ServeConfig()))
    for content, param in ((body, "messages.0.content"), (parts, "messages.0.content.0.text")):
        response = client.post("/v1/chat/completions", content=content)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_float_wav_holding_nan_or_infinity_is_an_input_error(value):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.array([0.0, value, 0.5], np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InputError, match="NaN or infinity"):
        load_audio(buffer.getvalue())


def test_an_mp3_whose_channel_count_changes_mid_stream_decodes():
    edits = [("delete", 30, 2169693692), ("byte", 764, 1318147505), ("delete", 429, 1103444674),
             ("duplicate", 389, 27191321)]  # fmt: skip
    samples = load_audio(apply_mutations(audio_seeds()["mp3"], edits))
    assert samples.ndim == 1 and samples.size > 0 and np.isfinite(samples).all()
