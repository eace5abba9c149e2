"""Curation: similarity thresholds and fractions, near-duplicate removal, rewritten paths and the report."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage import data

import mmlm
from mmlm.cli import main
from mmlm.data.curate import (
    CurateSettings,
    best_caption_similarity,
    curate,
    keep_top_fraction,
    near_duplicates,
)
from mmlm.data.readers import open_pairs
from mmlm.errors import InputError

PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry"]


@pytest.fixture(scope="module")
def model(model_dir):
    return mmlm.load(model_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A manifest of real photos with captions, a resized copy of one photo, a missing file and no caption."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(root / "img" / f"{name}.jpg", quality=90)
    Image.open(root / "img" / "astronaut.jpg").resize((400, 400)).save(root / "img" / "copy.jpg", quality=80)
    rows = [{"image": f"img/{name}.jpg", "text": f"a photo of the {name}"} for name in PHOTOS]
    rows[2]["text"] = ["a cat", "a photo of a sleepy cat", "chelsea"]  # several captions: the best one counts
    rows += [
        {"image": "img/copy.jpg", "text": "the astronaut again"},  # row 7: near-duplicate of row 1
        {"image": "img/gone.jpg", "text": "a file that is not there"},  # row 8
        {"image": "img/coffee.jpg", "text": ""},  # row 9: no caption
    ]
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def expected_scores(model, manifest):
    """Best-caption cosine per usable row, computed directly from the model's embeddings."""
    reader = open_pairs(manifest)
    scores = {}
    for i in range(len(reader)):
        try:
            pair = reader.read(i)
        except Exception:
            continue
        if not pair.image.is_file():
            continue
        image = model.encode_image([pair.image])[0]
        scores[i + 1] = max(float(image @ text) for text in model.encode_text(list(pair.captions)))
    return scores


def kept_rows(out, manifest):
    """Return the manifest row number of each pair in `out`, matched by resolved image path and captions."""
    source = open_pairs(manifest)
    rows = {(p.image.resolve(), p.captions): int(p.key.rsplit(":", 1)[1]) for p in source}
    return [rows[(pair.image.resolve(), pair.captions)] for pair in open_pairs(out)]


def test_best_caption_similarity_takes_the_maximum_per_image():
    images = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    captions = np.array([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]], np.float32)
    assert best_caption_similarity(images, captions, np.array([0, 0, 1])).tolist() == pytest.approx(
        [1.0, 0.6]
    )


def test_keep_top_fraction_keeps_the_highest_and_earlier_on_ties():
    keep, lowest = keep_top_fraction(np.array([0.1, 0.5, 0.3, 0.5, 0.2]), 0.5)
    assert keep.tolist() == [False, True, True, True, False] and lowest == pytest.approx(0.3)
    keep, _ = keep_top_fraction(np.array([0.5, 0.5, 0.5]), 0.34)
    assert keep.tolist() == [True, True, False]


def test_near_duplicates_keep_the_first_occurrence_and_follow_only_kept_rows():
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.96, 0.28, 0.0])  # cos(a, b) = 0.96
    c = np.array([0.84, 0.5426, 0.0])  # cos(b, c) ≈ 0.958, cos(a, c) = 0.84
    d = np.array([0.0, 0.0, 1.0])
    x = np.stack([a, b, c, d, a]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    duplicate_of, cosine = near_duplicates(x, 0.95, chunk=2)  # chunks cross the pairs
    assert duplicate_of.tolist() == [-1, 0, -1, -1, 0]  # c stays: its only close row, b, was dropped
    assert cosine[1] == pytest.approx(0.96, abs=1e-5) and cosine[4] == pytest.approx(1.0, abs=1e-5)


def test_min_similarity_drops_pairs_below_the_threshold(tmp_path, model, dataset):
    scores = expected_scores(model, dataset)
    ordered = sorted(scores.values())
    threshold = (ordered[3] + ordered[4]) / 2  # between two scores, so batching's rounding cannot move a row
    out = tmp_path / "out" / "filtered.jsonl"
    report = curate(model, dataset, out, CurateSettings(min_similarity=threshold, dedup_threshold=None))
    assert sorted(kept_rows(out, dataset)) == sorted(row for row, s in scores.items() if s >= threshold)
    low = [row for row in report["dropped"] if row["reason"] == "low_similarity"]
    assert sorted(r["row"] for r in low) == sorted(row for row, s in scores.items() if s < threshold)
    assert all(r["similarity"] == pytest.approx(scores[r["row"]], abs=1e-5) for r in low)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(row["similarity"] >= threshold - 1e-6 for row in written)
    first = written[0]["image"]  # relative to the output file's folder
    assert (
        first.startswith("../")
        and (out.parent / first).resolve().parent == (dataset.parent / "img").resolve()
    )


def test_keep_fraction_and_duplicate_removal_with_a_report(tmp_path, model, dataset):
    scores = expected_scores(model, dataset)
    out = tmp_path / "filtered.jsonl"
    report = curate(model, dataset, out, CurateSettings(keep_fraction=1.0, dedup_threshold=0.999))
    assert kept_rows(out, dataset) == [1, 2, 3, 4, 5, 6]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[2]["text"] == ["a cat", "a photo of a sleepy cat", "chelsea"]
    assert written[2]["similarity"] == pytest.approx(scores[3], abs=1e-5)
    reasons = {row["row"]: row["reason"] for row in report["dropped"]}
    assert reasons == {7: "near_duplicate", 8: "unreadable_image", 9: "missing_caption"}
    duplicate = next(row for row in report["dropped"] if row["row"] == 7)
    assert duplicate["duplicate_of"]["row"] == 1 and duplicate["duplicate_of"]["cosine"] > 0.999
    assert report["counts"] == {
        "rows": 9,
        "kept": 6,
        "dropped": 3,
        "dropped_by_reason": {"near_duplicate": 1, "unreadable_image": 1, "missing_caption": 1},
    }
    assert json.loads((tmp_path / "filtered.report.json").read_text()) == report

    half = curate(
        model, dataset, tmp_path / "half.jsonl", CurateSettings(keep_fraction=0.5, dedup_threshold=None)
    )
    top = sorted(scores, key=lambda row: -scores[row])[: math.ceil(0.5 * len(scores))]
    assert sorted(kept_rows(tmp_path / "half.jsonl", dataset)) == sorted(top)
    assert half["similarity_threshold"] == pytest.approx(min(scores[row] for row in top), abs=1e-5)


def test_cli_curate_writes_manifest_and_report(tmp_path, model_dir, dataset, capsys):
    out = tmp_path / "c.jsonl"
    argv = ["curate", "--model", str(model_dir), "--data", str(dataset), "--out", str(out)]
    assert main([*argv, "--dedup-threshold", "0.999", "--report", str(tmp_path / "r.json")]) == 0
    assert "kept 6 of 9 pairs" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["kept"] == 6
    assert main([*argv, "--min-similarity", "0.2", "--keep-fraction", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmlm: error: give --min-similarity or --keep-fraction, not both"
    assert main([*argv, "--keep-fraction", "1.5"]) == 2
    assert "--keep-fraction must be in (0, 1]" in capsys.readouterr().err


def test_curate_refuses_a_missing_manifest(tmp_path, model):
    with pytest.raises(InputError, match="file not found"):
        curate(model, tmp_path / "none.jsonl", tmp_path / "out.jsonl", CurateSettings())


def test_a_copy_under_another_name_is_dropped_as_a_duplicate(tmp_path, model, dataset):
    shutil.copy(dataset.parent / "img" / "rocket.jpg", tmp_path / "rocket.jpg")
    shutil.copy(dataset.parent / "img" / "rocket.jpg", tmp_path / "rocket_copy.jpg")
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": name, "text": "a rocket"} for name in ("rocket.jpg", "rocket_copy.jpg")]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = curate(model, manifest, tmp_path / "o.jsonl", CurateSettings(dedup_threshold=0.95))
    assert [(r["row"], r["reason"], r["duplicate_of"]["row"]) for r in report["dropped"]] == [
        (2, "near_duplicate", 1)
    ]
