"""A checkpoint folder's manifest: the size and sha256 of every file in it, so a truncated, altered or missing file
is named before anything is loaded from the folder.

manifest.json holds {"files": {relative path: {"size": bytes, "sha256": hex digest}}}. Files added to the
folder after the manifest was written are not checked; a folder without a manifest cannot be checked at all.
"""

import hashlib
import json
import os
from pathlib import Path

from mmlm.errors import InputError
from mmlm.json_files import read_json_object

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of the file at `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_entries(folder: Path) -> dict[str, dict[str, int | str]]:
    """Return {relative path: {"size", "sha256"}} for every file under `folder` except the manifest itself."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files
    }


def write_manifest(folder: Path) -> Path:
    """Write `folder`/manifest.json listing the size and sha256 of its files, flushed to disk; return its path."""
    path = folder / MANIFEST
    with path.open("w") as f:
        f.write(json.dumps({"files": manifest_entries(folder)}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def verify_manifest(folder: Path) -> bool:
    """Check every file the folder's manifest lists; return False when there is no manifest (nothing to check).

    Raises InputError naming the first missing, truncated or altered file.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return False
    files = read_json_object(path).get("files")
    if not isinstance(files, dict):
        raise InputError(f'{path}: expected a JSON object with a "files" object')
    for name, entry in files.items():
        target = folder / name
        if not target.is_file():
            raise InputError(f"{target}: missing (listed in {path}); the checkpoint is incomplete")
        size = target.stat().st_size
        if size != entry.get("size"):
            raise InputError(
                f"{target}: {size} bytes, but {MANIFEST} says {entry.get('size')}; the file is truncated or altered"
            )
        if file_sha256(target) != entry.get("sha256"):
            raise InputError(f"{target}: sha256 differs from {MANIFEST}; the file is corrupt or altered")
    return True
