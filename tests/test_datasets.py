"""Image-text datasets: every format reads the same pairs, corrupt samples are skipped and counted (also in
DataLoader workers), order is seeded, resume is exact, worker and rank shards cover each sample once, and the
training augmentation crops and flips as documented, into uint8 pixels normalised on the device."""

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from mmlm.data.augment import EvalTransform, TrainTransform, mentions_side
from mmlm.data.datasets import PairCollate, PairDataset, PairLoader
from mmlm.data.readers import (
    CocoCaptions,
    CsvPairs,
    JsonlPairs,
    ParquetPairs,
    TarPairs,
    expand_braces,
    open_pairs,
)
from mmlm.data.synthetic import shapes
from mmlm.errors import InputError
from mmlm.processing.image import ImageProcessor, PixelNormalize, load_image

N = 12


# ---- fixtures: one shapes-world sample set written in every format ----


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    shapes.write_dataset(root, N, seed=0, image_size=32, with_scene=False)
    return root


def _records(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "manifest.jsonl").read_text().splitlines()]


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_all_formats(world: Path) -> dict[str, dict]:
    """Write the world's pairs as CSV, TSV, tar shards, COCO, Karpathy and Parquet; return open_pairs args."""
    records = _records(world)
    images = [(world / r["image"]).read_bytes() for r in records]
    for name, delimiter in (("pairs.csv", ","), ("pairs.tsv", "\t")):
        with (world / name).open("w", newline="") as stream:
            writer = csv.writer(stream, delimiter=delimiter)
            writer.writerow(["filepath", "title"])
            writer.writerows((r["image"], r["text"]) for r in records)
    for shard in range(2):
        with tarfile.open(world / f"shard-{shard}.tar", "w") as tar:
            for i in range(shard * N // 2, (shard + 1) * N // 2):
                _add(tar, f"{i:09d}.png", images[i])
                # img2dataset writes both a .txt and a .json; either one must do
                if i % 2:
                    _add(tar, f"{i:09d}.txt", records[i]["text"].encode())
                else:
                    _add(tar, f"{i:09d}.json", json.dumps({"caption": records[i]["text"]}).encode())
    coco = {
        "images": [{"id": 100 + i, "file_name": r["image"]} for i, r in enumerate(records)],
        "annotations": [{"id": i, "image_id": 100 + i, "caption": r["text"]} for i, r in enumerate(records)],
    }
    (world / "captions.json").write_text(json.dumps(coco))
    karpathy = {
        "images": [
            {
                "filepath": "images",
                "filename": Path(r["image"]).name,
                "split": "train" if i % 3 else "restval",
                "imgid": i,
                "sentences": [{"raw": r["text"], "tokens": r["text"].split()}],
            }
            for i, r in enumerate(records)
        ]
        + [{"filepath": "images", "filename": "nope.png", "split": "test", "imgid": 99, "sentences": []}],
        "dataset": "coco",
    }
    (world / "karpathy.json").write_text(json.dumps(karpathy))
    texts = [r["text"] for r in records]
    pq.write_table(pa.table({"image": images, "text": texts}), world / "bytes.parquet", row_group_size=5)
    hf_images = pa.array([{"bytes": b, "path": r["image"]} for b, r in zip(images, records, strict=True)])
    pq.write_table(pa.table({"image": hf_images, "caption": texts}), world / "hf.parquet", row_group_size=4)
    return {
        "jsonl": {"source": world / "manifest.jsonl"},
        "csv": {"source": world / "pairs.csv", "image_column": "filepath", "text_column": "title"},
        "tsv": {"source": world / "pairs.tsv", "image_column": "filepath", "text_column": "title"},
        "webdataset": {"source": str(world / "shard-{0..1}.tar")},
        "coco": {"source": world / "captions.json"},
        "karpathy": {"source": world / "karpathy.json", "split": ["train", "restval"]},
        "parquet": {"source": world / "bytes.parquet"},
        "parquet-hf": {"source": [world / "hf.parquet"], "text_column": "caption"},
    }


def _content(pair_image: Path | bytes) -> str:
    return hashlib.sha1(np.asarray(load_image(pair_image)).tobytes()).hexdigest()


def test_every_format_reads_the_same_pairs(world: Path) -> None:
    expected = sorted((r["text"], _content(world / r["image"])) for r in _records(world))
    kinds = {
        "jsonl": JsonlPairs, "csv": CsvPairs, "tsv": CsvPairs, "webdataset": TarPairs, "coco": CocoCaptions,
        "karpathy": CocoCaptions, "parquet": ParquetPairs, "parquet-hf": ParquetPairs,
    }  # fmt: skip
    for name, args in _write_all_formats(world).items():
        reader = open_pairs(**args)
        assert isinstance(reader, kinds[name]), name
        pairs = list(reader)
        assert len(reader) == len(pairs) == N, name
        assert len({p.key for p in pairs}) == N, f"{name}: keys must be unique"
        assert sorted((p.captions[0], _content(p.image)) for p in pairs) == expected, name
    (world / "pairs.txt").write_bytes((world / "pairs.tsv").read_bytes())  # format= overrides the suffix
    assert (
        len(open_pairs(world / "pairs.txt", format="tsv", image_column="filepath", text_column="title")) == N
    )
    karpathy = open_pairs(world / "karpathy.json", format="karpathy", split="restval")
    assert len(karpathy) == 4 and karpathy.read(0).key == "0"


def test_brace_patterns_expand_like_bash() -> None:
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{3..1}.tar") == ["3.tar", "2.tar", "1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_multiple_captions_one_chosen_per_sample_and_epoch(tmp_path: Path, world: Path) -> None:
    options = {f"image{i}": [f"caption {i} {c}" for c in "abc"] for i in range(4)}
    manifest = tmp_path / "multi.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": str(world / f"images/{i:06d}.png"), "text": options[f"image{i}"]}) + "\n"
            for i in range(4)
        )
    )
    assert open_pairs(manifest).read(2).captions == tuple(options["image2"])

    def chosen(seed: int) -> dict[str, list[str]]:
        dataset, seen = PairDataset(open_pairs(manifest), seed=seed), {}
        for _ in range(8):  # each pass is one epoch
            for sample in dataset:
                seen.setdefault(sample.key, []).append(sample.caption)
        return seen

    first = chosen(seed=1)
    assert first == chosen(seed=1)
    for key, captions in first.items():
        index = int(key.rsplit(":", 1)[1]) - 1
        assert set(captions) <= set(options[f"image{index}"]) and len(set(captions)) > 1, captions


# ---- corrupt samples ----


def _corrupt_jsonl(tmp_path: Path, world: Path) -> Path:
    """A manifest of the world's 12 good pairs and one of each corrupt kind, the last one corrupt."""
    (tmp_path / "garbage.jpg").write_bytes(b"not a jpeg at all" * 10)
    (tmp_path / "truncated.png").write_bytes((world / "images/000000.png").read_bytes()[:60])
    lines = [{"image": str(world / r["image"]), "text": r["text"]} for r in _records(world)]
    lines[3:3] = [{"image": "missing.png", "text": "gone"}, {"image": "garbage.jpg", "text": "noise"}]
    lines[8:8] = [
        {"image": str(world / "images/000001.png"), "text": "  "},
        {"image": str(world / "images/000002.png")},
    ]
    lines += [{"image": "truncated.png", "text": "cut short"}]
    path = tmp_path / "corrupt.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


CORRUPT_COUNTS = {"missing_image": 1, "undecodable_image": 2, "missing_caption": 2}


def _corrupt_shard(tmp_path: Path, world: Path) -> Path:
    png = (world / "images/000000.png").read_bytes()
    path = tmp_path / "corrupt.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "good.png", png)
        _add(tar, "good.txt", b"a good caption\n")
        _add(tar, "notext.png", png)
        _add(tar, "noimage.txt", b"a caption without an image")
        _add(tar, "badjson.png", png)
        _add(tar, "badjson.json", b"{not json")
        _add(tar, "cut.txt", b"this image is cut short")
        _add(tar, "cut.png", png)
    with tarfile.open(path) as tar:
        offset = tar.getmember("cut.png").offset_data
    path.write_bytes(path.read_bytes()[: offset + 40])  # mid-member, as a copy that died would leave it
    return path


def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path: Path, world: Path) -> None:
    dataset = PairDataset(open_pairs(_corrupt_jsonl(tmp_path, world)), TrainTransform(size=16), seed=0)
    samples = list(dataset)
    assert len(samples) == N and all(s.pixels.shape == (3, 16, 16) for s in samples)
    assert dataset.skipped == CORRUPT_COUNTS
    list(dataset)  # a second epoch skips them again
    assert dataset.skipped == {reason: 2 * n for reason, n in CORRUPT_COUNTS.items()}

    shard = PairDataset(open_pairs(_corrupt_shard(tmp_path, world)), seed=0)
    assert [s.key for s in shard] == ["good"] and [s.caption for s in PairDataset(shard.reader)] == [
        "a good caption"
    ]
    assert shard.skipped == {"missing_caption": 2, "missing_image": 1, "truncated_member": 1}


def test_skip_counts_reach_the_main_process_from_workers(tmp_path: Path, world: Path) -> None:
    # unshuffled and batch 2: the truncated sample is the last position of the stream, so it is reported by a
    # worker's closing progress-only item rather than with a sample
    dataset = PairDataset(
        open_pairs(_corrupt_jsonl(tmp_path, world)), TrainTransform(16), shuffle=False, batch_size=2
    )
    loader = PairLoader(dataset, num_workers=2)
    keys = [key for batch in loader for key in batch.keys]
    assert len(keys) == len(set(keys)) == N
    assert loader.skipped == CORRUPT_COUNTS and dataset.epoch == 1
    assert dataset.state_dict()["skipped"] == CORRUPT_COUNTS


def test_an_epoch_with_every_sample_skipped_is_an_input_error(tmp_path: Path) -> None:
    manifest = tmp_path / "wrong_root.jsonl"
    manifest.write_text('{"image": "nowhere/a.png", "text": "x"}\n{"image": "nowhere/b.png", "text": "y"}\n')
    with pytest.raises(InputError, match="wrong_root.jsonl.*every sample"):
        list(PairDataset(open_pairs(manifest)))
    with pytest.raises(InputError, match="every sample"):
        list(PairLoader(PairDataset(open_pairs(manifest)), num_workers=2))


# ---- order, resume and sharding ----


def _dataset(path: Path, **options) -> PairDataset:
    return PairDataset(open_pairs(path), TrainTransform(size=16, scale=(0.5, 1.0), flip=True), **options)


def _batches(loader: PairLoader, limit: int | None = None) -> list[list[tuple[str, str, float]]]:
    """Return each batch as (key, caption, pixel checksum) triples; stop after `limit` batches."""
    out = []
    for batch in loader:
        out.append(
            [
                (k, c, round(float(p.double().sum()), 3))
                for k, c, p in zip(batch.keys, batch.captions, batch.pixels, strict=True)
            ]
        )
        if limit is not None and len(out) == limit:
            break
    return out


def test_order_is_seeded_per_epoch(world: Path) -> None:
    manifest = world / "manifest.jsonl"
    first, again, other = (PairLoader(_dataset(manifest, seed=s, batch_size=4)) for s in (3, 3, 4))
    epoch0 = _batches(first)
    assert epoch0 == _batches(again)
    assert epoch0 != _batches(other)
    epoch1 = _batches(first)
    assert epoch1 != epoch0 and sorted(k for b in epoch1 for k, _, _ in b) == sorted(
        k for b in epoch0 for k, _, _ in b
    )
    # without skipped samples the batches do not depend on the number of workers
    assert _batches(PairLoader(_dataset(manifest, seed=3, batch_size=4), num_workers=2)) == epoch0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_exactly_the_remaining_batches(tmp_path: Path, world: Path, num_workers: int) -> None:
    manifest = _corrupt_jsonl(tmp_path, world)  # 17 samples, 5 corrupt: workers fill batches across chunks

    def loader(**options) -> PairLoader:
        return PairLoader(_dataset(manifest, seed=5, batch_size=3, **options), num_workers=num_workers)

    whole = loader()
    expected = _batches(whole) + _batches(whole)  # two epochs
    cuts = range(len(expected)) if num_workers == 0 else [1, 2, 3, len(expected) // 2, len(expected) // 2 + 1]
    for cut in cuts:
        first = loader()
        got = _batches(first, limit=cut)
        if sum(len(b) for b in got) == N:  # the cut ends epoch 0: the next pass starts epoch 1
            got += _batches(first, limit=cut - len(got)) if cut > len(got) else []
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = loader()
        resumed.load_state_dict(state)
        while sum(len(b) for b in got) < 2 * N:
            got += _batches(resumed)
        assert got == expected, f"cut after {cut} batches"
        assert resumed.skipped == {reason: 2 * n for reason, n in CORRUPT_COUNTS.items()}


def test_resume_with_other_workers_and_batch_size_gives_the_remaining_samples(
    tmp_path: Path, world: Path
) -> None:
    manifest = _corrupt_jsonl(tmp_path, world)
    first = PairLoader(_dataset(manifest, seed=5, batch_size=3), num_workers=2)
    head = [key for batch in _batches(first, limit=2) for key, _, _ in batch]
    state = first.state_dict()
    assert state["position"] < min(state["ahead"]) < state["position"] // 6 * 6 + 6  # a gap in a chunk of 6
    resumed = PairLoader(_dataset(manifest, seed=5, batch_size=6), num_workers=0)
    resumed.load_state_dict(state)
    tail = [key for batch in _batches(resumed) for key, _, _ in batch]
    assert len(head) == 6 and sorted(head + tail) == sorted(s.key for s in _dataset(manifest, seed=5))


def test_resume_without_a_loader_num_workers_0(world: Path) -> None:
    dataset = _dataset(world / "manifest.jsonl", seed=2)
    expected = [(s.key, s.caption) for s in dataset]
    first = _dataset(world / "manifest.jsonl", seed=2)
    stream = iter(first)
    head = [(s.key, s.caption) for _, s in zip(range(5), stream, strict=False)]
    assert first.consumed == 5
    resumed = _dataset(world / "manifest.jsonl", seed=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [(s.key, s.caption) for s in resumed] == expected


def test_workers_see_every_key_once_per_epoch(world: Path) -> None:
    loader = PairLoader(_dataset(world / "manifest.jsonl", batch_size=5), num_workers=2)
    for _ in range(2):
        keys = [key for batch in loader for key in batch.keys]
        assert sorted(keys) == sorted(f"manifest.jsonl:{i}" for i in range(1, N + 1))


def test_ranks_split_each_epoch_without_overlap(world: Path) -> None:
    shards = []
    for rank in range(3):
        dataset = _dataset(world / "manifest.jsonl", seed=1, rank=rank, world_size=3, batch_size=2)
        assert len(dataset) == N // 3
        loader = PairLoader(dataset, num_workers=2 if rank == 1 else 0)
        shards.append([key for batch in loader for key in batch.keys])
    assert sorted(sum(shards, [])) == sorted(f"manifest.jsonl:{i}" for i in range(1, N + 1))
    with pytest.raises(InputError, match="rank"):
        _dataset(world / "manifest.jsonl", rank=3, world_size=3)


def test_collate_tokenizes_and_pins(world: Path) -> None:
    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 1] for t in texts])

    loader = PairLoader(_dataset(world / "manifest.jsonl", batch_size=4), collate=PairCollate(tokenizer))
    batch = next(iter(loader))
    assert batch.pixels.shape == (4, 3, 16, 16) and batch.tokens.tolist() == [
        [len(c), 1] for c in batch.captions
    ]
    if torch.cuda.is_available():  # pinning needs an accelerator
        assert batch.pin_memory().pixels.is_pinned()


def test_workers_send_uint8_batches_a_quarter_of_float32(world: Path) -> None:
    loader = PairLoader(_dataset(world / "manifest.jsonl", batch_size=4), num_workers=2)
    batch = next(iter(loader))
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (4, 3, 16, 16)
    assert batch.pixels.untyped_storage().nbytes() == 4 * 3 * 16 * 16  # float32 pixels took 4 bytes each


def test_uint8_batches_normalised_on_the_device_equal_the_float_path(world: Path) -> None:
    processor = ImageProcessor.clip(16)
    table = torch.from_numpy(processor.value_table())  # [3, 256]: the float path's per-level values
    loader = PairLoader(_dataset(world / "manifest.jsonl", batch_size=4, seed=3), collate=PairCollate())
    pixels = next(iter(loader)).pixels  # [4, 3, 16, 16] uint8: the same crops as before, seed 3
    floats = torch.stack([table[c][pixels[:, c].long()] for c in range(3)], dim=1)
    normalised = PixelNormalize(processor)(pixels)
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised, floats, atol=1e-6, rtol=0)
    assert PixelNormalize(processor)(pixels, torch.bfloat16).dtype == torch.bfloat16
    assert PixelNormalize(processor)(floats) is floats  # log-mels and float pixels pass unchanged
    chameleon = ImageProcessor.chameleon(16)  # rescale 0.0078, no mean/std: one float32 rounding off
    expected = torch.stack(
        [torch.from_numpy(chameleon.value_table())[c][pixels[:, c].long()] for c in range(3)], 1
    )
    torch.testing.assert_close(PixelNormalize(chameleon)(pixels), expected, atol=1e-6, rtol=0)


# ---- augmentation ----


def test_train_transform_shape_range_and_determinism() -> None:
    transform = TrainTransform(size=(24, 32), scale=(0.3, 1.0))
    photo = Image.fromarray(data.chelsea())
    pixels, caption = transform(photo, "a cat", np.random.default_rng(0))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 32) and caption == "a cat"
    assert torch.equal(pixels, transform(photo, "a cat", np.random.default_rng(0))[0])
    assert not torch.equal(pixels, transform(photo, "a cat", np.random.default_rng(1))[0])


def test_a_whole_image_crop_equals_inference_preprocessing() -> None:
    photo = Image.fromarray(data.astronaut())  # square, so the centre crop keeps everything
    transform = TrainTransform(size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), fast_decode=False)
    assert transform.crop_box(512, 512, np.random.default_rng(0)) == (0, 0, 512, 512)
    pixels, _ = transform(photo, "x", np.random.default_rng(0))
    processor = ImageProcessor.clip(64)
    assert torch.equal(PixelNormalize(processor)(pixels), processor([photo])[0])  # the same bits
    assert torch.equal(EvalTransform(processor)(photo, "x", np.random.default_rng(0))[0], pixels)


def test_crop_boxes_follow_random_resized_crop() -> None:
    transform, rng = TrainTransform(size=8, scale=(0.2, 0.6), ratio=(0.5, 2.0)), np.random.default_rng(0)
    for _ in range(200):
        left, top, width, height = transform.crop_box(400, 300, rng)
        assert left >= 0 and left + width <= 400 and top >= 0 and top + height <= 300
        assert 0.19 <= width * height / 120_000 <= 0.61 and 0.48 <= width / height <= 2.05
    # no try fits (the whole area at aspect 1 is 346 px wide): torchvision's centre crop at the nearest ratio
    assert TrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0)).crop_box(400, 300, rng) == (50, 0, 300, 300)


def test_flip_is_off_by_default_and_skipped_for_left_right_captions() -> None:
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 255  # dark left half, bright right half
    image = Image.fromarray(half)

    def flipped(transform: TrainTransform, caption: str) -> list[bool]:
        runs = [transform(image, caption, np.random.default_rng(seed)) for seed in range(20)]
        assert all(text == caption for _, text in runs)  # captions are never rewritten
        return [bool(pixels[0, 0, 0] > pixels[0, 0, -1]) for pixels, _ in runs]

    whole = {"size": 16, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    assert not any(flipped(TrainTransform(**whole), "a square"))
    assert 0 < sum(flipped(TrainTransform(**whole, flip=True), "a square")) < 20
    for caption in ("a circle on the left", "a cross to the Right of a star", "the leftmost bar"):
        assert mentions_side(caption) and not any(flipped(TrainTransform(**whole, flip=True), caption))
    assert not mentions_side("a bright red heart")


def test_big_jpegs_decode_in_draft_mode_at_least_twice_the_output(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(data.astronaut()).resize((2048, 2048)).save(path, quality=90)
    transform = TrainTransform(size=96)
    drafted = load_image(path, draft_size=transform.draft_size())
    assert 2 * 96 <= drafted.width < 2048  # 2048 -> 256 (1/8 scale)
    whole = {"size": 96, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}  # the same crop from either decode
    fast, _ = TrainTransform(**whole)(path, "x", np.random.default_rng(0))
    full, _ = TrainTransform(**whole, fast_decode=False)(path, "x", np.random.default_rng(0))
    assert fast.shape == full.shape == (3, 96, 96)
    assert (fast.float() - full.float()).abs().mean() < 3.5  # grey levels


# ---- bad inputs ----


def test_bad_inputs_raise_input_error_naming_the_file(tmp_path: Path, world: Path) -> None:
    with pytest.raises(InputError, match="pairs.txt"):
        open_pairs(tmp_path / "pairs.txt")
    with pytest.raises(InputError, match="missing.jsonl: file not found"):
        open_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="unknown format 'xml'"):
        open_pairs(world / "manifest.jsonl", format="xml")
    with pytest.raises(InputError, match=r"options \['split'\] do not apply to jsonl"):
        open_pairs(world / "manifest.jsonl", split="train")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"image": "a.png", "text": "ok"}\n{"text": "no image"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        open_pairs(bad_line)
    (tmp_path / "cols.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(InputError, match=r"cols.csv: no column 'image'.*\['path', 'caption'\]"):
        open_pairs(tmp_path / "cols.csv")
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8b" + b"x" * 600)
    with pytest.raises(InputError, match="junk.tar: not an uncompressed tar"):
        open_pairs(tmp_path / "junk.tar")
    _write_all_formats(world)
    with pytest.raises(InputError, match=r"karpathy.json: no images in split 'validation'.*'restval'"):
        open_pairs(world / "karpathy.json", split="validation")
    with pytest.raises(InputError, match="captions.json: format='karpathy'"):
        open_pairs(world / "captions.json", format="karpathy")
    dataset = _dataset(world / "manifest.jsonl", seed=0)
    with pytest.raises(InputError, match="seed=1"):
        dataset.load_state_dict(_dataset(world / "manifest.jsonl", seed=1).state_dict())
    with pytest.raises(InputError, match="scale"):
        TrainTransform(scale=(0.5, 0.2))


@pytest.mark.parametrize(
    ("coco", "message"),
    [
        (
            {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1}]},
            r"annotations\[0\]: missing field 'caption'",
        ),
        ({"images": [{"file_name": "a.png"}], "annotations": []}, r"images\[0\]: missing field 'id'"),
        ({"images": [], "annotations": {}}, r'a JSON object with a "annotations" list'),
    ],
)
def test_a_malformed_coco_captions_file_names_the_entry(tmp_path: Path, coco: dict, message: str) -> None:
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(InputError, match=message):
        CocoCaptions(path)
