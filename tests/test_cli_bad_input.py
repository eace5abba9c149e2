"""Every bad input gets one clear error line and exit status 2, never a traceback."""

import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from mmlm.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.radial_gradient("L").convert("RGB").save(path, quality=90)
    return path


def png_declaring(width: int, height: int) -> bytes:
    """Return a PNG whose header declares a huge size over a tiny body (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return status, err


def bad_image(tmp_path, photo, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        path.write_bytes(photo.read_bytes()[:600])
    elif kind == "bomb":
        path = path.with_suffix(".png")
        path.write_bytes(png_declaring(100_000, 100_000))
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "not found"),
        ("empty", "0 bytes"),
        ("text", "image"),
        ("truncated", "truncated"),
        ("bomb", "pixels"),
    ],
)
def test_bad_image_files(tmp_path, capsys, model_dir, photo, kind, expected):
    path = bad_image(tmp_path, photo, kind)
    status, err = run(capsys, "similarity", "--model", model_dir, "--image", path, "--text", "a cat")
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("mmlm: error:")
    assert path.name in err and expected in err.lower()


def test_empty_text_list_and_labels(capsys, model_dir, photo):
    status, err = run(capsys, "similarity", "--model", model_dir, "--image", photo)
    assert status == 2 and "--text" in err
    status, err = run(capsys, "classify", "--model", model_dir, "--image", photo, "--labels", " , ")
    assert status == 2 and "--labels" in err


def test_model_folder_without_weights(tmp_path, capsys, model_dir, photo):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    status, err = run(capsys, "similarity", "--model", folder, "--image", photo, "--text", "x")
    assert status == 2 and "no weights" in err and str(folder) in err


def test_pickle_checkpoint_is_refused(tmp_path, capsys, model_dir, photo):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    status, err = run(capsys, "similarity", "--model", folder, "--image", photo, "--text", "x")
    assert status == 2 and "pytorch_model.bin" in err and "safetensors" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "/nonexistent/model"], "not found"),
        (["--device", "tpu:0"], "device"),
        (["--dtype", "float8"], "dtype"),
        (["--batch-size", "0"], "batch-size"),
    ],
)
def test_bad_model_arguments(capsys, model_dir, photo, args, expected):
    argv = ["similarity", "--model", model_dir, "--image", photo, "--text", "x", *args]
    status, err = run(capsys, *argv)
    assert status == 2 and expected in err


def test_unsupported_model_type(tmp_path, capsys, photo):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    status, err = run(capsys, "similarity", "--model", tmp_path, "--image", photo, "--text", "x")
    assert status == 2 and "'bert' is not supported" in err


def test_entry_point_prints_one_line_without_traceback(tmp_path, model_dir):
    missing = tmp_path / "nope.jpg"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmlm",
            "similarity",
            "--model",
            str(model_dir),
            "--image",
            str(missing),
            "--text",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mmlm: error: {missing}: file not found; expected an image file"
    ]


def test_similarity_and_classify_output(capsys, model_dir, photo):
    import json

    status = main(
        [
            "similarity",
            "--model",
            str(model_dir),
            "--image",
            str(photo),
            "--text",
            "a",
            "--text",
            "b",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert status == 0 and out[0]["image"] == str(photo)
    assert sum(out[0]["scores"].values()) == pytest.approx(1.0, abs=1e-5)  # CLIP: softmax over texts
    status = main(["classify", "--model", str(model_dir), "--image", str(photo), "--labels", "cat,dog,car"])
    table = capsys.readouterr().out.splitlines()
    assert status == 0 and table[0].split() == ["cat", "dog", "car"] and table[1].startswith("photo.jpg")
