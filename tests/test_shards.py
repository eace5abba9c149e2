"""`mmlm shard`: resized webdataset shards that TarPairs reads back, with skips counted and bad input refused."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmlm.cli import main
from mmlm.data.readers import open_pairs
from mmlm.data.shards import REPORT, ShardSettings, resized_image, write_shards
from mmlm.errors import InputError


def _photo(width: int, height: int, mode: str = "RGB", seed: int = 0, noise: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width * height).reshape(height, width, 1)
    pixels = (ramp + rng.integers(0, noise + 1, (height, width, len(mode)))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.fixture
def manifest(tmp_path):
    """A JSONL manifest of six rows: a large JPEG, a small PNG, a large RGBA PNG, an EXIF-rotated small JPEG
    (two captions), a truncated JPEG and a missing file."""
    (tmp_path / "big.jpg").write_bytes(_encoded(_photo(640, 480), "JPEG", quality=90))
    (tmp_path / "small.png").write_bytes(_encoded(_photo(100, 80), "PNG"))
    (tmp_path / "alpha.png").write_bytes(_encoded(_photo(500, 300, "RGBA", seed=1), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 120x60, seen 60x120
    (tmp_path / "rotated.jpg").write_bytes(_encoded(_photo(120, 60, seed=2), "JPEG", exif=exif))
    (tmp_path / "broken.jpg").write_bytes(_encoded(_photo(300, 200), "JPEG")[:400])
    rows = [("big.jpg", "a big photo"), ("small.png", "a small one"), ("alpha.png", "with alpha"),
            ("rotated.jpg", ["turned", "on its side"]), ("broken.jpg", "cut short"), ("gone.jpg", "missing")]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": i, "text": t}) + "\n" for i, t in rows))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_hold_resized_images_and_read_back_in_order(manifest, tmp_path, workers):
    settings = ShardSettings(size=128, per_shard=3)
    report = write_shards(open_pairs(manifest), tmp_path / "out", settings, workers=workers)
    assert report["samples"] == 4 and report["shards"] == 2
    assert report["skipped_by_reason"] == {"missing_image": 1, "undecodable_image": 1}
    assert json.loads((tmp_path / "out" / REPORT).read_text()) == report
    assert not list((tmp_path / "out").glob("*.tmp"))
    pairs = list(open_pairs(report["pattern"]))
    assert [p.captions for p in pairs] == [("a big photo",), ("a small one",), ("with alpha",),
                                           ("turned", "on its side")]  # fmt: skip
    sizes = [Image.open(io.BytesIO(p.image)).size for p in pairs]
    formats = [Image.open(io.BytesIO(p.image)).format for p in pairs]
    # 640x480 -> shorter side 128; the small PNG kept byte for byte; RGBA re-encoded as JPEG; the rotated
    # JPEG re-encoded upright (60x120 as seen, under 128 so not scaled)
    assert sizes == [(171, 128), (100, 80), (213, 128), (60, 120)]
    assert formats == ["JPEG", "PNG", "JPEG", "JPEG"]
    assert pairs[1].image == (manifest.parent / "small.png").read_bytes()
    assert report["image_bytes_out"] < report["image_bytes_in"]


def test_resized_image_is_the_bicubic_resize_of_the_source(tmp_path):
    from skimage import data  # a real photograph: JPEG error on it is what users see

    source = Image.fromarray(data.astronaut()).crop((0, 0, 512, 384))
    stored, extension = resized_image(_encoded(source, "PNG"), ShardSettings(size=150, quality=95))
    assert extension == "jpg"
    stored = np.asarray(Image.open(io.BytesIO(stored)), dtype=np.float32)
    expected = np.asarray(source.resize((200, 150), Image.Resampling.BICUBIC), dtype=np.float32)
    assert stored.shape == expected.shape
    # JPEG at quality 95 on top of the same resize: 2.2 levels on average here (a mirrored image: 82)
    assert np.abs(stored - expected).mean() < 3


def test_a_second_run_into_the_same_folder_and_bad_settings_are_refused(manifest, tmp_path):
    write_shards(open_pairs(manifest), tmp_path / "out", ShardSettings(size=64))
    with pytest.raises(InputError, match="already holds"):
        write_shards(open_pairs(manifest), tmp_path / "out", ShardSettings(size=64))
    for bad, field in ((ShardSettings(size=2), "--size"), (ShardSettings(quality=0), "--quality"),
                       (ShardSettings(per_shard=0), "--per-shard")):  # fmt: skip
        with pytest.raises(InputError, match=field):
            bad.check()


def test_a_dataset_with_no_usable_sample_writes_nothing(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"image": "bad.jpg", "text": "x"}) + "\n")
    with pytest.raises(InputError, match="no usable sample"):
        write_shards(open_pairs(manifest), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar*"))


def test_cli_writes_shards_and_refuses_bad_input_with_one_line(manifest, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shard", "--data", str(manifest), "--out", str(out), "--size", "96", "--workers", "1",
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 4 and report["size"] == 96
    assert main(["shard", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert main(["shard", "--data", str(manifest), "--out", str(tmp_path / "y"), "--size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mmlm: error: ") for line in err)
