"""The image index: search finds what was indexed, builds resume after kill -9, IVF is checked against exact."""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from skimage import data
from sklearn.datasets import load_digits

import mmlm
from fixtures_models import write_tiny_clip
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.index import AnnSettings, ImageIndex, ImageRecord, build_index
from mmlm.index.vectors import choose_nlist, recall_at_k

PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry", "moon", "text"]
DIGITS = 4


@pytest.fixture(scope="module")
def model(model_dir):
    return mmlm.load(model_dir)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photographs (scikit-image) and handwritten digits (scikit-learn), plus one file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=90)
    digits = load_digits()
    for i in range(DIGITS):
        pixels = (digits.images[i] * 15).astype(np.uint8)  # 0..16 -> 0..240
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(folder / f"digit_{i}.png")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


def image_files(folder):
    return sorted(p for p in folder.iterdir() if p.name != "broken.jpg")


def fake_records(n, start=0):
    return [ImageRecord(f"img{i}.png", hashlib.sha256(str(i).encode()).hexdigest(), 8, 8) for i in range(start, start + n)]  # fmt: skip


def clustered(n, dim, clusters, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_each_indexed_image_finds_itself_first(tmp_path, model, model_dir, photos):
    report = build_index(model, model_dir, photos, tmp_path / "index", batch_size=4)
    files = image_files(photos)
    assert (report.added, report.unreadable, report.images) == (len(files), 1, len(files))
    assert report.skipped[0]["path"].endswith("broken.jpg")
    assert "not a readable image" in report.skipped[0]["reason"]
    with ImageIndex.open(tmp_path / "index") as index:
        hits = index.search(model.encode_image([str(f) for f in files]), k=3)
        for file, found in zip(files, hits, strict=True):
            assert found[0].path == str(file.resolve())
            assert found[0].score == pytest.approx(1.0, abs=1e-5)
            assert found[1].score < found[0].score


def test_text_search_returns_k_hits_with_metadata(tmp_path, model, model_dir, photos):
    manifest = tmp_path / "photos.jsonl"
    rows = [
        {"image": os.path.relpath(photos / f"{name}.jpg", tmp_path), "text": f"a photo: {name}"}
        for name in PHOTOS
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_index(model, model_dir, manifest, tmp_path / "index")
    with ImageIndex.open(tmp_path / "index") as index:
        hits = index.search(model.encode_text(["a cat on a sofa"]), k=5)[0]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    for hit in hits:
        name = hit.path.rsplit("/", 1)[1].removesuffix(".jpg")
        assert hit.caption == f"a photo: {name}"
        file = photos / f"{name}.jpg"
        assert hit.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert (hit.width, hit.height) == Image.open(file).size


def test_incremental_add_and_readding_is_a_no_op(tmp_path, model, model_dir, photos):
    first = tmp_path / "first"
    first.mkdir()
    for file in image_files(photos)[:5]:
        shutil.copy(file, first / file.name)
    assert build_index(model, model_dir, first, tmp_path / "index").images == 5
    report = build_index(model, model_dir, photos, tmp_path / "index")
    total = len(image_files(photos))
    assert (report.added, report.already_indexed, report.images) == (total - 5, 5, total)
    again = build_index(model, model_dir, photos, tmp_path / "index")
    assert (again.added, again.already_indexed, again.images) == (0, total, total)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(photos / "chelsea.jpg", renamed / "my_cat.jpg")  # same content under another name
    report = build_index(model, model_dir, renamed, tmp_path / "index")
    assert (report.added, report.already_indexed, report.images) == (0, 1, total)


def test_a_changed_file_replaces_its_row_and_a_second_build_is_refused(tmp_path, model, model_dir, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos / "coffee.jpg", folder / "today.jpg")
    build_index(model, model_dir, folder, tmp_path / "ix")
    Image.fromarray(data.rocket()).save(folder / "today.jpg")  # same name, new picture
    report = build_index(model, model_dir, folder, tmp_path / "ix")
    assert (report.added, report.replaced, report.images) == (1, 1, 1)
    with ImageIndex.open(tmp_path / "ix") as index:
        hit = index.search(model.encode_image([folder / "today.jpg"]), k=5)[0]
        assert len(hit) == 1 and hit[0].score == pytest.approx(1.0, abs=1e-5)
        assert hit[0].sha256 == hashlib.sha256((folder / "today.jpg").read_bytes()).hexdigest()
    with open(tmp_path / "ix" / "build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another build holds the index
        with pytest.raises(InputError, match="being built by another process"):
            build_index(model, model_dir, folder, tmp_path / "ix")


SLOW_BUILD = """
import sys, time
import mmlm.index.store as store
add = store.ImageIndex.add
def slow_add(self, *args, **kwargs):
    ids = add(self, *args, **kwargs)
    time.sleep(0.4)  # leaves time to kill the build between committed batches
    return ids
store.ImageIndex.add = slow_add
from mmlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def row_count(database):
    if not database.exists():
        return 0
    with sqlite3.connect(database) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.OperationalError:  # table not created yet
            return 0


@pytest.mark.slow
def test_build_killed_mid_way_resumes_without_duplicates_or_losses(tmp_path, model_dir, photos):
    args = [
        "index",
        "build",
        "--model",
        str(model_dir),
        "--images",
        str(photos),
        "--index",
        str(tmp_path / "ix"),
    ]
    database, total = tmp_path / "ix" / "index.sqlite", len(image_files(photos))
    build = subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILD, *args, "--batch-size", "2"], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while row_count(database) < 4 and time.monotonic() < deadline and build.poll() is None:
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    build.wait()
    done_before = row_count(database)
    assert 4 <= done_before < total, "the kill should land mid-build"
    assert not (tmp_path / "ix" / "vectors.faiss").exists()  # FAISS is saved at the end; SQLite has the rows

    resumed = subprocess.run(
        [sys.executable, "-m", "mmlm", *args, "--json"], capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert (report["added"], report["already_indexed"], report["images"]) == (
        total - done_before,
        done_before,
        total,
    )
    with sqlite3.connect(database) as db:
        paths = [row[0] for row in db.execute("SELECT path FROM images")]
        hashes = {row[0] for row in db.execute("SELECT sha256 FROM images")}
    assert sorted(paths) == sorted(str(f.resolve()) for f in image_files(photos))
    assert len(hashes) == total
    with ImageIndex.open(tmp_path / "ix") as index:
        assert index.vectors.ntotal == total


def test_open_adds_rows_the_faiss_file_lacks_and_drops_rows_sqlite_no_longer_has(tmp_path):
    vectors = clustered(8, 16, 3)
    index = ImageIndex.create(tmp_path / "ix", dim=16)
    index.add(fake_records(5), vectors[:5])
    index.save()
    index.add(fake_records(3, start=5), vectors[5:])  # committed to SQLite, never saved to FAISS
    index.close()
    with ImageIndex.open(tmp_path / "ix") as index:
        assert index.vectors.ntotal == 8
        assert index.search(vectors[7], k=1)[0][0].path == "img7.png"
        index.save()
    with sqlite3.connect(tmp_path / "ix" / "index.sqlite") as db:
        db.execute("DELETE FROM images WHERE path = 'img2.png'")  # as if removed after the last save
    with ImageIndex.open(tmp_path / "ix") as index:
        assert index.vectors.ntotal == 7
        found = {hit.path for hit in index.search(vectors, k=7)[0]}
        assert "img2.png" not in found and len(found) == 7


def test_query_of_the_wrong_dimension_is_refused(tmp_path):
    with ImageIndex.create(tmp_path / "ix", dim=16) as index:
        index.add(fake_records(2), clustered(2, 16, 1))
        with pytest.raises(InputError, match=r"expected embeddings of shape \[N, 16\].*got \[1, 12\]"):
            index.search(np.ones(12, np.float32), k=1)
        with pytest.raises(InputError, match="-k"):
            index.search(np.ones(16, np.float32), k=0)


def test_index_refuses_a_different_model(tmp_path, model, model_dir, photos):
    build_index(model, model_dir, photos, tmp_path / "ix")
    other = tmp_path / "other"
    write_tiny_clip(other, seed=1)
    with ImageIndex.open(tmp_path / "ix") as index, pytest.raises(InputError, match="embeds differently"):
        index.check_model(mmlm.load(other))


def test_recall_at_k_counts_shared_ids():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_large_index_switches_to_ivf_and_records_its_recall(tmp_path):
    vectors = clustered(4000, 32, 40, seed=1)
    settings = AnnSettings(threshold=3000, sample_queries=200, target_recall=0.95)
    with ImageIndex.create(tmp_path / "ix", dim=32) as index:
        index.add(fake_records(2500), vectors[:2500])
        assert index.finalize(settings)["kind"] == "flat"  # below the threshold: exact search
        index.add(fake_records(1500, start=2500), vectors[2500:])
        report = index.finalize(settings)
    assert report["kind"] == "ivf" and report["nlist"] == choose_nlist(4000) == 4000 // 39
    assert report["recall_at_10"] >= 0.95 and 1 <= report["nprobe"] < report["nlist"]
    with ImageIndex.open(tmp_path / "ix") as index:
        assert index.info["kind"] == "ivf" and index.info["recall_at_10"] == report["recall_at_10"]
        assert index.info["nprobe"] == report["nprobe"]
        hits = index.search(vectors[:50], k=10)
        exact = np.argsort(-(vectors[:50] @ vectors.T), axis=1)[:, :10] + 1  # SQLite ids start at 1
        assert recall_at_k(np.array([[h.id for h in row] for row in hits]), exact) >= 0.9
        index.add(fake_records(10, start=4000), clustered(10, 32, 40, seed=2))  # IVF takes additions too
        assert index.search(clustered(10, 32, 40, seed=2)[3], k=1)[0][0].path == "img4003.png"
        index.remove([5, 6, 7])  # IVF keeps the right ids after removals (an IDMap over IVF would not)
        assert [row[0].id for row in index.search(vectors[100:110], k=1)] == list(range(101, 111))
    with sqlite3.connect(tmp_path / "ix" / "index.sqlite") as db:
        db.execute("DELETE FROM images WHERE id = 200")  # removed after the last save
    with ImageIndex.open(tmp_path / "ix") as index:
        assert index.vectors.ntotal == 4010 - 3 - 1 and index.info["kind"] == "ivf"
        assert index.search(vectors[199], k=1)[0][0].id != 200
        assert [row[0].id for row in index.search(vectors[300:305], k=1)] == list(range(301, 306))


def test_cli_build_prints_the_ann_recall_check_and_search_prints_a_table(tmp_path, model_dir, photos, capsys):
    index = str(tmp_path / "ix")
    args = ["index", "build", "--model", str(model_dir), "--images", str(photos), "--index", index]
    assert main([*args, "--ann-threshold", "10"]) == 0
    out = capsys.readouterr().out
    assert f"added {len(image_files(photos))} images" in out and "1 unreadable" in out
    ivf_line = "IVF search (nlist=1, nprobe=1): recall@10 1.000 against exact search on 12 sample queries"
    assert ivf_line in out
    assert main([*args, "--ann-threshold", "10"]) == 0  # nothing new: the recorded check is reported
    assert "added 0 images" in (out := capsys.readouterr().out) and ivf_line in out
    assert main(["search", "--index", index, "--text", "a cat", "-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "path", "caption"] and len(lines) == 5
    assert main(["search", "--index", index, "--image", str(photos / "rocket.jpg"), "-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["path"] == str((photos / "rocket.jpg").resolve())
    assert set(result["hits"][0]) == {"rank", "score", "id", "path", "caption", "sha256", "width", "height"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--index", "{tmp}/nowhere", "--text", "a cat"], "is not an mmlm index"),
        (["search", "--index", "{index}"], "give exactly one of --text or --image"),
        (["search", "--index", "{index}", "--text", "a cat", "--image", "x.jpg"], "give exactly one of"),
        (["search", "--index", "{index}", "--image", "{tmp}/missing.jpg"], "missing.jpg: file not found"),
        (
            ["index", "build", "--model", "{model}", "--images", "{tmp}/none", "--index", "{tmp}/i"],
            "not found",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, model, model_dir, photos, capsys, args, message):
    index = tmp_path / "index"
    with ImageIndex.create(index, dim=16, model_info={"model_path": str(model_dir)}):
        pass
    argv = [a.format(tmp=tmp_path, index=index, model=model_dir) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmlm: error:") and "\n" not in err and message in err
