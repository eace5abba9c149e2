"""Pre-resized webdataset shards (`mmlm shard`), written once so that every training epoch decodes small images.

A loader that crops 224-px samples from 3000-px photos spends most of its time decoding pixels it throws away:
JPEG draft mode only scales by 1/2, 1/4 or 1/8, and PNG or WebP get no shortcut at all. img2dataset's answer
is to resize the dataset once; this does the same for any source `open_pairs` reads (JSONL, CSV/TSV, COCO,
Karpathy, Parquet, other shards). Each image is scaled so that its shorter side is `size` pixels (aspect ratio
kept, never enlarged) and stored as a JPEG at `quality`; an image already small enough keeps its original
bytes when it is a JPEG, PNG or WebP, so nothing is re-encoded for nothing. Shards follow img2dataset's
layout, which `TarPairs` (`data.source: DIR/shard-{000000..000009}.tar`) and webdataset read: `KEY.jpg` with
`KEY.json` holding {"caption": str or [str, ...], "key": the source's key}. Keys are the sample's position in
the output (9 digits), because a source key may hold dots or slashes that webdataset's key rule would split.

Samples the source cannot give, or whose image does not decode, are skipped and counted by reason (the
readers' SKIP_REASONS). Each shard is written to a temporary name and renamed when complete, so an interrupted
run never leaves a truncated shard under a shard's name; `shards.json` beside them records what was written.
Decoding and resizing run in a pool of worker processes, results kept in source order.
"""

import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

from mmlm.data.readers import CorruptSample, PairReader
from mmlm.errors import InputError
from mmlm.processing.image import MAX_PIXELS, load_image
from mmlm.progress import Progress

# PIL format name -> the member extension TarPairs reads, for images kept as they are
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
REPORT = "shards.json"


@dataclass(frozen=True)
class ShardSettings:
    """How images are stored: shorter side `size` px at most, JPEG `quality`, `per_shard` samples per tar."""

    size: int = 256
    quality: int = 95
    per_shard: int = 10_000
    max_pixels: int = MAX_PIXELS

    def check(self) -> None:
        """Raise InputError for settings that cannot be used."""
        if self.size < 8:
            raise InputError(f"--size: expected at least 8 pixels, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise InputError(f"--quality: expected 1 to 100, got {self.quality}")
        if self.per_shard < 1:
            raise InputError(f"--per-shard: expected at least 1 sample per shard, got {self.per_shard}")


def resized_image(image: Path | bytes, settings: ShardSettings) -> tuple[bytes, str]:
    """Return (encoded bytes, member extension) of one image with its shorter side at most settings.size.

    Raises InputError when the image cannot be decoded.
    """
    original = image.read_bytes() if isinstance(image, Path) else bytes(image)
    # a full decode first (load_image checks size, truncation and format, and raises InputError); the draft
    # keeps both sides at least `size`, so the shorter side is never decoded below the target
    picture = load_image(original, settings.max_pixels, (settings.size, settings.size))
    with Image.open(io.BytesIO(original)) as probe:  # the header again: original size, format, orientation
        kept = _KEPT_FORMATS.get(probe.format or "")
        upright = probe.getexif().get(ExifTags.Base.Orientation, 1) == 1
        small = min(probe.size) <= settings.size and upright
    if small and kept is not None:
        return original, kept
    width, height = picture.size
    scale = settings.size / min(width, height)
    if scale < 1:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = picture.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=settings.quality)
    return out.getvalue(), "jpg"


def _prepare(job: tuple[PairReader, int, ShardSettings]) -> tuple[Any, ...]:
    """Worker: read sample `index` and resize its image; return ("ok", bytes, ext, captions, key, size in) or
    ("skip", reason)."""
    reader, index, settings = job
    try:
        pair = reader.read(index)
    except CorruptSample as skipped:
        return ("skip", skipped.reason)
    if isinstance(pair.image, Path) and not pair.image.is_file():
        return ("skip", "missing_image")
    try:
        data, extension = resized_image(pair.image, settings)
    except (InputError, OSError):
        return ("skip", "undecodable_image")
    size_in = pair.image.stat().st_size if isinstance(pair.image, Path) else len(pair.image)
    return ("ok", data, extension, pair.captions, pair.key, size_in)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input, the same bytes
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Opens shard after shard under temporary names; each is renamed into place once closed."""

    def __init__(self, out: Path, prefix: str, per_shard: int) -> None:
        self.out, self.prefix, self.per_shard = out, prefix, per_shard
        self.tar: tarfile.TarFile | None = None
        self.count, self.paths = 0, []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None:
            self.path = self.out / f"{self.prefix}-{len(self.paths):06d}.tar"
            temporary = self.path.with_suffix(".tar.tmp")  # open across add() calls; close() ends it
            self.tar = tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        for extension, data in members.items():
            _add_member(self.tar, f"{key}.{extension}", data)
        self.count += 1
        if self.count == self.per_shard:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        temporary = self.path.with_suffix(".tar.tmp")
        with temporary.open("rb") as f:
            os.fsync(f.fileno())
        temporary.replace(self.path)
        self.paths.append(self.path)
        self.tar, self.count = None, 0


def _results(reader: PairReader, settings: ShardSettings, workers: int) -> Iterator[tuple[Any, ...]]:
    jobs = ((reader, index, settings) for index in range(len(reader)))
    if workers <= 1:
        yield from map(_prepare, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_prepare, jobs, chunksize=16)


def write_shards(
    reader: PairReader, out: str | Path, settings: ShardSettings = ShardSettings(), workers: int = 1,
    prefix: str = "shard",
) -> dict[str, Any]:  # fmt: skip
    """Write every usable pair of `reader` into resized webdataset shards in `out`; return the report.

    `out` must not hold shards already (a second run into the same folder would mix two datasets).
    """
    settings.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; expected a folder for the shards")
    if out.is_dir() and any(out.glob(f"{prefix}-*.tar*")):
        raise InputError(f"{out}: already holds {prefix}-*.tar shards; expected an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    start, written, bytes_in, bytes_out, skipped = time.perf_counter(), 0, 0, 0, Counter()
    writer = _ShardWriter(out, prefix, settings.per_shard)
    progress = Progress(len(reader), desc="shard", every=max(1, len(reader) // 20))
    try:
        for done, result in enumerate(_results(reader, settings, workers), 1):
            if result[0] == "skip":
                skipped[result[1]] += 1
            else:
                _, data, extension, captions, key, size_in = result
                caption = captions[0] if len(captions) == 1 else list(captions)
                text = json.dumps({"caption": caption, "key": key}, ensure_ascii=False).encode()
                writer.add(f"{written:09d}", {extension: data, "json": text})
                written, bytes_in, bytes_out = written + 1, bytes_in + size_in, bytes_out + len(data)
            progress.update(done, {"written": written, "skipped": sum(skipped.values())})
        writer.close()
    finally:
        progress.close()
        if writer.tar is not None:  # interrupted mid-shard: the partial shard is not left behind
            writer.tar.close()
            writer.path.with_suffix(".tar.tmp").unlink(missing_ok=True)
    if written == 0:
        raise InputError(f"{reader.name}: no usable sample among {len(reader)}; nothing written")
    report = {
        "source": reader.name, "out": str(out), "samples": written, "shards": len(writer.paths),
        "pattern": str(out / f"{prefix}-{{{0:06d}..{len(writer.paths) - 1:06d}}}.tar"),
        "skipped_by_reason": dict(sorted(skipped.items())), "size": settings.size,
        "quality": settings.quality, "image_bytes_in": bytes_in, "image_bytes_out": bytes_out,
        "seconds": round(time.perf_counter() - start, 2),
    }  # fmt: skip
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
