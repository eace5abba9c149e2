"""Readers of image-text pairs, one per file format, and `open_pairs`, which picks one by file suffix.

Every reader is a random-access list of samples: `len(reader)` and `reader.read(i) -> Pair`, where a `Pair`
holds the image (a path or encoded bytes, not yet decoded), its captions and a key that names the sample in
its file. Random access is what lets `PairDataset` visit samples in a seeded permutation and resume at an
exact position. A sample that cannot be used raises `CorruptSample` with a reason from `SKIP_REASONS`; a
file that cannot be read at all raises `InputError` when the reader opens it.

Formats: a JSONL manifest, CSV/TSV, webdataset tar shards (img2dataset layout), COCO-captions JSON and the
Karpathy split file, Parquet with image bytes. Paths inside a file are relative to that file's folder.
"""

import bisect
import csv
import json
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlm.errors import InputError
from mmlm.json_files import json_field, json_items, jsonl_rows, read_json

SKIP_REASONS = (
    "missing_image",
    "undecodable_image",
    "missing_caption",
    "truncated_member",
    "unreadable_record",
)
FORMATS = ("jsonl", "csv", "tsv", "webdataset", "coco", "karpathy", "parquet")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tar": "webdataset", ".json": "coco", ".parquet": "parquet",
}  # fmt: skip
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Pair:
    """One stored image-text pair: the image as a path or encoded bytes, its captions and a stable key."""

    key: str
    image: Path | bytes
    captions: tuple[str, ...]


class CorruptSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, key: str, detail: str = "") -> None:
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.key = reason, key


class PairReader(ABC):
    """A random-access list of image-text pairs read from one or more files."""

    name: str  # the file (or first shard), for messages

    @abstractmethod
    def __len__(self) -> int:
        """Return the number of samples, corrupt ones included."""

    @abstractmethod
    def read(self, index: int) -> Pair:
        """Return sample `index`, or raise CorruptSample."""

    def __iter__(self) -> Iterator[Pair]:
        """Yield the usable pairs in stored order (corrupt ones are left out; PairDataset counts them)."""
        for index in range(len(self)):
            try:
                yield self.read(index)
            except CorruptSample:
                continue


def _captions(value: Any, key: str) -> tuple[str, ...]:
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    captions = tuple(text.strip() for text in texts if isinstance(text, str) and text.strip())
    if not captions:
        raise CorruptSample("missing_caption", key, f"got {value!r}")
    return captions


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected an image-text dataset file")
    return path


class JsonlPairs(PairReader):
    """A JSONL manifest: `{"image": path relative to the manifest, "text": "caption" | ["c1", ...]}` per line."""

    def __init__(self, path: PathLike) -> None:
        self.path = _existing_file(path)
        self.name = str(self.path)
        self._rows: list[tuple[int, str, Any]] = []  # (line number, image, text)
        for number, record in jsonl_rows(self.path):
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise InputError(
                    f"{self.path}:{number}: expected an object with an 'image' path and a 'text' caption"
                )
            self._rows.append((number, record["image"], record.get("text")))

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, index: int) -> Pair:
        number, image, text = self._rows[index]
        key = f"{self.path.name}:{number}"
        return Pair(key, self.path.parent / image, _captions(text, key))


class CsvPairs(PairReader):
    """A CSV (comma, quoted) or TSV (tab, no quoting) file with a header naming the image and caption columns."""

    def __init__(
        self,
        path: PathLike,
        image_column: str = "image",
        text_column: str = "text",
        delimiter: str | None = None,
    ) -> None:
        self.path = _existing_file(path)
        self.name = str(self.path)
        tsv = self.path.suffix.lower() == ".tsv" if delimiter is None else delimiter == "\t"
        # TSV as in the IANA definition: no quoting, so a caption may start with a quote mark (CC3M's do)
        quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
        self._rows: list[tuple[str, str]] = []
        try:
            with self.path.open(encoding="utf-8", newline="") as stream:
                rows = csv.DictReader(stream, delimiter="\t" if tsv else ",", quoting=quoting)
                columns = rows.fieldnames or []
                for column, field in ((image_column, "image_column"), (text_column, "text_column")):
                    if column not in columns:
                        raise InputError(
                            f"{self.path}: no column {column!r} ({field}); columns are {columns}"
                        )
                self._rows = [(row[image_column] or "", row[text_column] or "") for row in rows]
        except (csv.Error, UnicodeDecodeError) as error:
            raise InputError(f"{self.path}: not a readable CSV/TSV file ({error})") from error

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, index: int) -> Pair:
        image, text = self._rows[index]
        key = f"{self.path.name}:{index + 1}"
        if not image.strip():
            raise CorruptSample("missing_image", key, "empty image cell")
        return Pair(key, self.path.parent / image.strip(), _captions(text, key))


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int
    extension: str
    truncated: bool


# Why tarfile and not the webdataset package: webdataset installs and reads plain local tars here, but it is a
# sequential pipeline (shard shuffle + shuffle buffer, splitting by node and worker at shard granularity, a
# truncated member dropped with a warning). PairDataset needs random access for its per-sample seeded
# permutation and exact resume, and a reason for each skip. tarfile gives each member's data offset while
# reading headers only, so one scan per shard indexes it and a sample is a seek and a read.
class TarPairs(PairReader):
    """Webdataset shards in img2dataset's layout: `key.jpg|png|webp` with `key.txt` or `key.json` ("caption")."""

    def __init__(self, shards: Sequence[PathLike]) -> None:
        self.shards = [_existing_file(shard) for shard in shards]
        self.name = str(self.shards[0]) + (
            f" (+{len(self.shards) - 1} shards)" if len(self.shards) > 1 else ""
        )
        self._samples: list[tuple[int, str, dict[str, _Member]]] = []  # (shard, key, members by extension)
        for number, shard in enumerate(self.shards):
            self._samples += [(number, key, members) for key, members in _scan_shard(shard).items()]

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, index: int) -> Pair:
        number, key, members = self._samples[index]
        image = next((members[ext] for ext in _TAR_IMAGE_EXTENSIONS if ext in members), None)
        text = members.get("txt", members.get("json"))
        for member in (image, text):
            if member is not None and member.truncated:
                raise CorruptSample("truncated_member", key, f"{key}.{member.extension} runs past the end")
        if image is None:
            raise CorruptSample("missing_image", key, f"no {'/'.join(_TAR_IMAGE_EXTENSIONS)} member")
        if text is None:
            raise CorruptSample("missing_caption", key, "no txt or json member")
        shard = self.shards[number]
        try:
            with shard.open("rb") as stream:
                data = [_read_at(stream, member) for member in (image, text)]
        except OSError as error:
            raise CorruptSample("unreadable_record", key, f"{shard}: {error}") from error
        if any(len(chunk) < member.size for chunk, member in zip(data, (image, text), strict=True)):
            raise CorruptSample("truncated_member", key, f"{shard} is shorter than its index")
        return Pair(key, data[0], _tar_captions(data[1], text.extension, key))


def _read_at(stream: Any, member: _Member) -> bytes:
    stream.seek(member.offset)
    return stream.read(member.size)


def _tar_captions(data: bytes, extension: str, key: str) -> tuple[str, ...]:
    try:
        text = data.decode("utf-8")
        value = json.loads(text).get("caption") if extension == "json" else text
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise CorruptSample("missing_caption", key, f"unreadable {extension} member") from error
    return _captions(value, key)


def _scan_shard(path: Path) -> dict[str, dict[str, _Member]]:
    try:
        with tarfile.open(path, mode="r:") as tar:
            return _index_members(tar, path.stat().st_size)
    except tarfile.ReadError as error:  # raised by open: the first header is unreadable
        raise InputError(
            f"{path}: not an uncompressed tar file ({error}); expected a webdataset shard"
        ) from error


def _index_members(tar: tarfile.TarFile, size: int) -> dict[str, dict[str, _Member]]:
    samples: dict[str, dict[str, _Member]] = {}
    while True:
        try:
            member = tar.next()  # reads one 512-byte header and seeks over the data
        except tarfile.ReadError:  # the previous member's data runs past the end of the file
            break
        if member is None:
            break
        # webdataset's rule: the key is the path up to the first dot of the file name
        folder, _, base = member.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if member.isfile() and dot:
            truncated = member.offset_data + member.size > size
            entry = _Member(member.offset_data, member.size, extension.lower(), truncated)
            samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[entry.extension] = entry
    return samples


class CocoCaptions(PairReader):
    """COCO-captions JSON (`images` + `annotations`) or a Karpathy split file (`images` with `sentences`)."""

    def __init__(
        self, path: PathLike, image_root: PathLike | None = None, split: str | Sequence[str] | None = None
    ) -> None:
        self.path = _existing_file(path)
        self.name = str(self.path)
        root = Path(image_root) if image_root is not None else self.path.parent
        data = read_json(self.path)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list) or not all(isinstance(image, dict) for image in images):
            raise InputError(f"{self.path}: expected a JSON object with an 'images' list (COCO or Karpathy)")
        try:
            if "annotations" in data:
                self.layout = "coco"
                if split is not None:
                    raise InputError(
                        f"{self.path}: split={split!r}, but a COCO captions file holds one split"
                    )
                self._samples = [(str(image_id), root / name, captions)
                                 for image_id, name, captions in coco_caption_groups(data, self.path)]  # fmt: skip
            else:
                self.layout = "karpathy"
                self._samples = _karpathy_samples(images, root, split, self.path)
        except (KeyError, TypeError) as error:
            raise InputError(
                f"{self.path}: malformed {self.layout} captions file (missing or bad field {error}); expected "
                "images [{id, file_name}] + annotations [{image_id, caption}], or Karpathy's "
                "images [{filepath, filename, split, sentences: [{raw}]}]"
            ) from error

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, index: int) -> Pair:
        key, image, captions = self._samples[index]
        return Pair(key, image, _captions(captions, key))


def coco_caption_groups(data: Any, path: PathLike) -> list[tuple[Any, str, list[Any]]]:
    """Return (image id, file_name, captions) per image of a COCO-captions JSON object (`images` [{id,
    file_name}] + `annotations` [{image_id, caption}]), or raise InputError naming the bad entry."""
    captions: dict[Any, list[Any]] = {}
    for i, item in enumerate(json_items(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        captions.setdefault(json_field(item, "image_id", where), []).append(
            json_field(item, "caption", where)
        )
    groups = []
    for i, item in enumerate(json_items(data, "images", path)):
        where = f"{path}: images[{i}]"
        image_id = json_field(item, "id", where)
        groups.append((image_id, json_field(item, "file_name", where), captions.get(image_id, [])))
    return groups


def _karpathy_samples(
    images: list[dict], root: Path, split: str | Sequence[str] | None, path: Path
) -> list[tuple[str, Path, list]]:
    # Karpathy's splits are train, restval, val and test; the usual 113k training set is ("train", "restval").
    wanted = {split} if isinstance(split, str) else set(split) if split is not None else None
    samples = []
    for image in images:
        if wanted is None or image["split"] in wanted:
            key = str(image.get("cocoid", image.get("imgid", image["filename"])))
            sentences = [sentence["raw"] for sentence in image.get("sentences", [])]
            samples.append((key, root / image.get("filepath", "") / image["filename"], sentences))
    if wanted is not None and not samples:
        present = sorted({str(image.get("split")) for image in images})
        raise InputError(f"{path}: no images in split {split!r}; the file's splits are {present}")
    return samples


class ParquetPairs(PairReader):
    """Parquet files with an image column (bytes, or HF datasets' struct {bytes, path}) and a caption column."""

    def __init__(
        self, files: Sequence[PathLike], image_column: str = "image", text_column: str = "text"
    ) -> None:
        import pyarrow.parquet as pq  # imported here: only Parquet datasets need it

        self.files = [_existing_file(file) for file in files]
        self.name = str(self.files[0]) + (f" (+{len(self.files) - 1} files)" if len(self.files) > 1 else "")
        self.columns = [image_column, text_column]
        self._groups: list[tuple[int, int, int]] = []  # (file, row group, first row of the group in its file)
        self._starts: list[int] = []  # global index of each group's first row
        total = 0
        for number, file in enumerate(self.files):
            try:
                metadata = pq.ParquetFile(file).metadata
            except Exception as error:  # pyarrow raises ArrowInvalid, OSError and others for a bad file
                raise InputError(f"{file}: not a readable Parquet file ({error})") from error
            names = metadata.schema.to_arrow_schema().names
            for column, field in ((image_column, "image_column"), (text_column, "text_column")):
                if column not in names:
                    raise InputError(f"{file}: no column {column!r} ({field}); columns are {names}")
            first = 0
            for group in range(metadata.num_row_groups):
                self._groups.append((number, group, first))
                self._starts.append(total)
                rows = metadata.row_group(group).num_rows
                first, total = first + rows, total + rows
        self._length = total
        self._cache: tuple[int, Any] | None = (
            None  # (group number, table): rows of one group are read together
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return self._length

    def read(self, index: int) -> Pair:
        import pyarrow.parquet as pq

        group_number = bisect.bisect_right(self._starts, index) - 1
        number, group, first = self._groups[group_number]
        file, row = self.files[number], index - self._starts[group_number]
        key = f"{file.name}:{first + row}"
        if self._cache is None or self._cache[0] != group_number:
            try:
                self._cache = (group_number, pq.ParquetFile(file).read_row_group(group, columns=self.columns))
            except Exception as error:
                raise CorruptSample("unreadable_record", key, str(error)) from error
        table = self._cache[1]
        image, text = (table.column(column)[row].as_py() for column in self.columns)
        if isinstance(image, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str) and image:
            image = file.parent / image
        if not isinstance(image, bytes | Path) or not image:
            raise CorruptSample("missing_image", key, f"no image bytes or path in column {self.columns[0]!r}")
        return Pair(key, image, _captions(text, key))


def expand_braces(pattern: str) -> list[str]:
    """Return the shard names a brace pattern names: `a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    if numbers := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        start, stop = numbers.groups()
        width = max(len(start), len(stop)) if start[0] == "0" or stop[0] == "0" else 0  # bash's padding rule
        step = 1 if int(stop) >= int(start) else -1
        options = [str(n).zfill(width) for n in range(int(start), int(stop) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]  # not a brace expression (bash leaves it as written)
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def _paths(source: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    paths = [Path(name) for item in items for name in expand_braces(os.fspath(item))]
    if not paths:
        raise InputError("pairs: got an empty list of files; expected a dataset file or shards")
    return paths


_OPTIONS = {
    "jsonl": set(), "csv": {"image_column", "text_column", "delimiter"}, "tsv": {"image_column", "text_column"},
    "webdataset": set(), "coco": {"image_root", "split"}, "karpathy": {"image_root", "split"},
    "parquet": {"image_column", "text_column"},
}  # fmt: skip


def open_pairs(
    source: PathLike | Sequence[PathLike], format: str | None = None, **options: Any
) -> PairReader:
    """Return the reader for a dataset file, a list of shards or a brace pattern, chosen by suffix or `format`.

    Suffixes: .jsonl, .csv, .tsv, .tar (webdataset), .json (COCO captions or a Karpathy split, told apart by
    their fields), .parquet. Options go to the reader: image_column/text_column (CSV, TSV, Parquet),
    image_root/split (COCO, Karpathy).
    """
    paths = _paths(source)
    explicit = format is not None
    if format is None:
        suffixes = sorted({path.suffix.lower() for path in paths})
        if len(suffixes) != 1 or suffixes[0] not in _SUFFIX_FORMATS:
            raise InputError(
                f"{paths[0]}: cannot tell the dataset format from the suffix {'/'.join(suffixes) or '(none)'}; "
                f"expected one of {sorted(_SUFFIX_FORMATS)} or format= one of {FORMATS}"
            )
        format = _SUFFIX_FORMATS[suffixes[0]]
    if format not in FORMATS:
        raise InputError(f"{paths[0]}: unknown format {format!r}; expected one of {FORMATS}")
    if unknown := sorted(set(options) - _OPTIONS[format]):
        raise InputError(
            f"{paths[0]}: options {unknown} do not apply to {format}; expected {sorted(_OPTIONS[format])}"
        )
    if format in ("webdataset", "parquet"):
        return TarPairs(paths) if format == "webdataset" else ParquetPairs(paths, **options)
    if len(paths) != 1:
        raise InputError(f"{paths[0]}: {format} reads one file; got {len(paths)}")
    if format == "jsonl":
        return JsonlPairs(paths[0])
    if format in ("csv", "tsv"):
        return CsvPairs(
            paths[0], delimiter="\t" if format == "tsv" else options.pop("delimiter", ","), **options
        )
    reader = CocoCaptions(paths[0], **options)
    if explicit and reader.layout != format:
        raise InputError(f"{paths[0]}: format={format!r}, but the file is in the {reader.layout} layout")
    return reader
