"""Building an image index: list the images, skip the known and the unreadable, embed in batches, commit.

A rerun over the same images (after new files arrived, or after a killed build) embeds only what the index
lacks: a file whose path, size and modification time match an indexed row is skipped unread, and any other
file is hashed and skipped when its SHA-256 is indexed already, under whatever name. A file whose content
changed under an indexed path replaces that path's row.
"""

import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmlm.data.readers import CorruptSample, open_pairs
from mmlm.errors import InputError
from mmlm.index.metadata import ImageRecord
from mmlm.index.store import ImageIndex, model_fingerprint
from mmlm.index.vectors import AnnSettings
from mmlm.json_files import jsonl_rows
from mmlm.processing.image import load_image
from mmlm.progress import Progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageSource:
    """One image to index: the name stored for it, where its bytes are, and its caption if it has one."""

    name: str
    image: Path | bytes
    caption: str | None = None


@dataclass
class BuildReport:
    """What one build did: counts, the files it skipped and why, its speed and the index's ANN check."""

    index: str
    sources: int
    added: int = 0
    already_indexed: int = 0
    replaced: int = 0  # indexed paths whose file changed; their old rows were removed
    unreadable: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} per unreadable image
    images: int = 0  # in the index after the build
    seconds: float = 0.0
    images_per_s: float = 0.0  # images added per second of the whole build
    ann: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return asdict(self)


def list_images(source: str | Path) -> tuple[list[ImageSource], list[dict[str, str]]]:
    """Return the images a folder (recursively) or a manifest names, and the manifest rows it cannot use."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [ImageSource(str(p.resolve()), p.resolve()) for p in files], []
    if not path.is_file():
        raise InputError(
            f"--images: {path} not found; expected an image folder or a manifest (.jsonl, .csv, ...)"
        )
    if path.suffix.lower() == ".jsonl":
        return _jsonl_images(path), []
    reader, sources, skipped = open_pairs(path), [], []
    for i in range(len(reader)):
        try:
            pair = reader.read(i)
        except CorruptSample as error:
            skipped.append({"path": error.key, "reason": error.reason})
            continue
        name = str(pair.image.resolve()) if isinstance(pair.image, Path) else pair.key
        image = pair.image.resolve() if isinstance(pair.image, Path) else pair.image
        sources.append(ImageSource(name, image, pair.captions[0]))
    return sources, skipped


def _jsonl_images(path: Path) -> list[ImageSource]:
    # the pair readers require a caption; an index does not, so a manifest of bare {"image": ...} rows works
    sources = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise InputError(f"{path}:{number}: expected an object with an 'image' path")
        text = row.get("text")
        texts = [text] if isinstance(text, str) else text if isinstance(text, list) else []
        captions = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        image = (path.parent / row["image"]).resolve()
        sources.append(ImageSource(str(image), image, captions[0] if captions else None))
    return sources


def build_index(
    model,
    model_path: str | Path,
    source: str | Path,
    folder: str | Path,
    batch_size: int = 32,
    ann: AnnSettings | None = None,
    save_every_s: float = 60.0,
    revision: str | None = None,
) -> BuildReport:
    """Add the images of a folder or manifest to the index in `folder` (created if absent); return a report."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    sources, skipped = list_images(source)
    start = time.perf_counter()
    report = BuildReport(str(folder), len(sources), unreadable=len(skipped), skipped=skipped)
    with _build_lock(Path(folder)):
        fingerprint = model_fingerprint(model, model_path, revision)
        _build(model, fingerprint, sources, folder, batch_size, ann, save_every_s, report, start)
    report.seconds = time.perf_counter() - start
    report.images_per_s = report.added / report.seconds if report.seconds else 0.0
    return report


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the index folder (released by the kernel even after kill -9)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--index: {folder} is a file; expected a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--index: {folder} is being built by another process") from None
        yield


def _build(model, fingerprint, sources, folder, batch_size, ann, save_every_s, report, start) -> None:
    last_save = start
    index = ImageIndex.open_or_create(folder, fingerprint)
    try:
        index.check_model(model)
        progress = Progress(len(sources), desc="index build", every=10)
        batch: list[tuple[ImageRecord, Image.Image, list[int]]] = []
        hashes_this_run: set[str] = set()

        def commit() -> None:
            records, images, replaces = zip(*batch, strict=True)
            vectors = model.encode_image(list(images), batch_size)
            index.remove([i for ids in replaces for i in ids])
            index.add(records, vectors)
            report.replaced += sum(bool(ids) for ids in replaces)
            report.added += len(batch)
            batch.clear()

        for done, item in enumerate(sources, start=1):
            outcome = _prepare(item, index, hashes_this_run)
            if isinstance(outcome, str):
                report.already_indexed += outcome == "already_indexed"
                if outcome != "already_indexed":
                    report.unreadable += 1
                    report.skipped.append({"path": item.name, "reason": outcome})
            else:
                batch.append(outcome)
            if len(batch) == batch_size or (done == len(sources) and batch):
                commit()
                if time.perf_counter() - last_save > save_every_s:
                    index.save()
                    last_save = time.perf_counter()
                elapsed = time.perf_counter() - start
                progress.update(
                    done,
                    {"images/s": report.added / elapsed, "added": report.added, "skipped": report.unreadable},
                )
        if progress.done != len(sources):
            progress.update(len(sources), {"added": report.added, "skipped": report.unreadable})
        progress.close()
        report.ann = index.finalize(ann)
        report.images = len(index)
    finally:
        index.close()


def _prepare(
    item: ImageSource, index: ImageIndex, hashes_this_run: set[str]
) -> tuple[ImageRecord, Image.Image, list[int]] | str:
    """Return a new image's record, decoded image and the rows it replaces; or "already_indexed"; or why not."""
    size = mtime = None
    if isinstance(item.image, Path):
        try:
            stat = item.image.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
            if index.metadata.unchanged(item.name, size, mtime):
                return "already_indexed"
            data = item.image.read_bytes()
        except OSError as error:
            return f"unreadable file ({error.strerror or error})"
    else:
        data = item.image
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in hashes_this_run or index.has_hash(sha256):
        return "already_indexed"
    try:
        image = load_image(data)
    except InputError as error:
        return str(error).removeprefix("<bytes>: ")
    hashes_this_run.add(sha256)
    record = ImageRecord(item.name, sha256, image.width, image.height, item.caption, size, mtime)
    replaces = index.metadata.ids_at_path(item.name) if isinstance(item.image, Path) else []
    return record, image, replaces
