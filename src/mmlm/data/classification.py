"""Labelled image sets for classification: a JSONL manifest `{"image": ..., "label": ...}` or an image folder
with one sub-folder per class. Classes are in sorted order, so label ids agree across tools."""

from dataclasses import dataclass
from pathlib import Path

from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledImages:
    """Image paths, their integer labels, and the class names the labels index."""

    images: list[Path]
    labels: list[int]
    class_names: list[str]

    def subset(self, indices: list[int]) -> "LabelledImages":
        """Return the samples at `indices`, with the same classes."""
        return LabelledImages(
            [self.images[i] for i in indices], [self.labels[i] for i in indices], self.class_names
        )


def _from_folder(root: Path) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: expected one sub-folder per class, found none")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        images += files
        labels += [label] * len(files)
    return LabelledImages(images, labels, classes)


def _from_manifest(path: Path) -> LabelledImages:
    rows = []
    for n, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or "label" not in row:
            raise InputError(f'{path}, line {n}: expected {{"image": "path", "label": "class"}}')
        rows.append((path.parent / row["image"], str(row["label"])))
    classes = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    return LabelledImages([p for p, _ in rows], [index[label] for _, label in rows], classes)


def open_labelled_images(source: str | Path) -> LabelledImages:
    """Return the labelled images of a JSONL manifest or a class-per-sub-folder image folder."""
    source = Path(source)
    if source.is_dir():
        data = _from_folder(source)
    elif source.is_file():
        data = _from_manifest(source)
    else:
        raise InputError(f"{source} not found (expected a JSONL manifest or an image folder)")
    if not data.images:
        raise InputError(f"{source}: no labelled images found")
    return data
