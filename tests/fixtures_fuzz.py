"""The fuzzers of tests/test_fuzz.py and benchmarks/fuzz.py: valid seed files built here, byte mutations of them,
and one target per boundary that must give a result or its one-line InputError for every input.

A mutation is (kind, position, value): `apply_mutations` applies a list of them to seed bytes. Hypothesis draws
the lists in the tests (so a failure shrinks to a short list); `random_mutations` draws them in the benchmark.
"""

import io
import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from mmlm.data.conversations import read_conversations
from mmlm.data.readers import JsonlPairs
from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows
from mmlm.processing.audio import load_audio
from mmlm.processing.image import ImageProcessor
from mmlm.processing.video import read_video

Mutation = tuple[str, int, int]  # (kind, position, value); position is taken modulo the data's length + 1

# Values that break size arithmetic when written over a length or dimension field.
HUGE_SIZES = (0, 1, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
# Fragments that stress parsers and text handling: deep nesting, huge numbers, odd unicode, template syntax.
TOKENS = (
    b"[" * 20_000, b'{"a":' * 5_000, b"9" * 5_000, b"1e999", b"-1e999", b"NaN", b"-0", b"\\ud800", b"\\udfff",
    "\u202e".encode(), "\ufeff".encode(), "\U0010ffff".encode(), b"\x00", b"\xff\xfe", b"\xc3", b'"', b"\\",
    b"<image>", b"<audio>", b"<video>", b"{{ 7 * 7 }}", b"{% for x in range(10) %}", b"\r\n", b",", b"null",
)  # fmt: skip
KINDS = ("flip", "byte", "truncate", "delete", "duplicate", "size_le", "size_be", "token")


def apply_mutations(data: bytes, mutations: Sequence[Mutation]) -> bytes:
    """Return `data` with each (kind, position, value) mutation applied in order."""
    out = bytearray(data)
    for kind, position, value in mutations:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << (value % 8)
        elif kind == "byte" and at < len(out):
            out[at] = value % 256
        elif kind == "truncate":
            del out[at:]
        elif kind == "delete":
            del out[at : at + 1 + value % 64]
        elif kind == "duplicate":
            out[at:at] = out[at : at + 1 + value % 256]
        elif kind in ("size_le", "size_be"):  # a huge (or zero) declared size over a 32-bit field
            size = HUGE_SIZES[value % len(HUGE_SIZES)]
            out[at : at + 4] = size.to_bytes(4, "little" if kind == "size_le" else "big")
        elif kind == "token":
            out[at:at] = TOKENS[value % len(TOKENS)]
    return bytes(out)


def random_mutations(rng: random.Random, length: int) -> list[Mutation]:
    """Return 1-4 random mutations, half of them aimed at the first 64 bytes, where the headers are."""
    mutations = []
    for _ in range(rng.randint(1, 4)):
        limit = 64 if rng.random() < 0.5 else max(length, 1)
        mutations.append((rng.choice(KINDS), rng.randrange(limit), rng.getrandbits(32)))
    return mutations


# --- seeds: valid files of every format a decoder reads ------------------------------------------------------


def _image_bytes(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def image_seeds() -> dict[str, bytes]:
    """Return small valid images by name: PNG (RGB, RGBA, palette, 16-bit), JPEG, GIF, BMP, WebP, TIFF."""
    pixels = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(10, 12, 3)
    rgb = Image.fromarray(pixels)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(120, dtype=np.uint16) * 500).reshape(10, 12))
    return {
        "png_rgb": _image_bytes(rgb, "PNG"),
        "png_rgba": _image_bytes(rgb.convert("RGBA"), "PNG"),
        "png_palette": _image_bytes(palette, "PNG", transparency=0),
        "png_16bit": _image_bytes(sixteen, "PNG"),
        "jpeg": _image_bytes(rgb, "JPEG", quality=90),
        "gif": _image_bytes(palette, "GIF"),
        "bmp": _image_bytes(rgb, "BMP"),
        "webp": _image_bytes(rgb, "WEBP"),
        "tiff": _image_bytes(rgb, "TIFF"),
    }


def _tone(rate: int, seconds: float = 0.05) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def _soundfile_bytes(samples: np.ndarray, rate: int, format: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def _mp3_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as container:
        stream = container.add_stream("mp3", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            (samples * 32767).astype(np.int16)[None], format="s16", layout="mono"
        )
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def audio_seeds() -> dict[str, bytes]:
    """Return short valid audio files by name: WAV (PCM 16, float stereo), FLAC, OGG Vorbis and MP3."""
    tone = _tone(16000)
    return {
        "wav_pcm16": _soundfile_bytes(tone, 16000, "WAV", "PCM_16"),
        "wav_float_stereo": _soundfile_bytes(np.stack([tone, -tone], 1), 16000, "WAV", "FLOAT"),
        "flac": _soundfile_bytes(tone, 16000, "FLAC"),
        "ogg": _soundfile_bytes(_tone(22050, 0.1), 22050, "OGG", "VORBIS"),
        "mp3": _mp3_bytes(_tone(22050, 0.1), 22050),
    }


def video_seeds() -> dict[str, bytes]:
    """Return a short valid H.264 MP4 (8 frames of 32x32 at 8 fps, a keyframe every 4)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"g": "4"}
        for i in range(8):
            frame = Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 128))
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return {"mp4": buffer.getvalue()}


_RECORD = (
    '{"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, '
    '{"from": "gpt", "value": "A red square."}]}'
)


def text_seeds() -> dict[str, bytes]:
    """Return valid LLaVA conversation files (JSON list and JSONL) and a JSONL image-text manifest."""
    return {
        "llava_json": f"[{_RECORD}, {_RECORD}]".encode(),
        "llava_jsonl": f"{_RECORD}\n{_RECORD}\n".encode(),
        "manifest_jsonl": b'{"image": "a.png", "text": "a cat"}\n{"image": "b.png", "text": ["x", "y"]}\n',
    }


# --- targets: each reads one input and returns, or raises InputError ----------------------------------------


def _written(data: bytes, folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def decode_image(data: bytes, folder: Path) -> None:
    """Decode and preprocess an image as a CLIP tower would, with a 1-megapixel limit."""
    ImageProcessor(size=16, crop_size=(16, 16), max_pixels=1 << 20)([data])


def decode_audio(data: bytes, folder: Path) -> None:
    """Decode audio to 16 kHz mono, capped at 60 s."""
    load_audio(data, max_seconds=60.0)


def decode_video(data: bytes, folder: Path) -> None:
    """Sample 3 frames of a video, capped at 60 s."""
    read_video(data, num_frames=3, max_seconds=60.0)


def read_llava(data: bytes, folder: Path) -> None:
    """Read a LLaVA conversations file (JSON list or JSONL)."""
    read_conversations(_written(data, folder, "conversations.json"))


def read_manifest(data: bytes, folder: Path) -> None:
    """Read a JSONL image-text manifest, every row, and the raw JSONL rows."""
    path = _written(data, folder, "pairs.jsonl")
    list(jsonl_rows(path))
    list(JsonlPairs(path))


Target = tuple[Callable[[], dict[str, bytes]], Callable[[bytes, Path], None]]
DECODERS: dict[str, Target] = {
    "image": (image_seeds, decode_image),
    "audio": (audio_seeds, decode_audio),
    "video": (video_seeds, decode_video),
    "llava": (lambda: {k: v for k, v in text_seeds().items() if k.startswith("llava")}, read_llava),
    "manifest": (lambda: {"manifest_jsonl": text_seeds()["manifest_jsonl"]}, read_manifest),
}


def check_one_line(error: InputError) -> None:
    """Fail unless an InputError's message is one non-empty line, as the CLI prints it."""
    message = str(error)
    assert message and "\n" not in message, f"InputError message is not one line: {message!r}"
