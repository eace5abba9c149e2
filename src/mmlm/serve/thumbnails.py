"""Thumbnails of indexed images for the search results: GET /v1/search/thumbnail/{row id or content hash}.

The request names a row of the index, never a file: the key must be a row id (digits) or a SHA-256 content
hash (64 hex digits), the path comes from the index's SQLite metadata, and the file there is served only while
its bytes still hash to the stored SHA-256. So no text from a request reaches the filesystem, and a file that
was swapped under an indexed path (a symlink to a secret, another image) is refused instead of shown.
"""

import asyncio
import hashlib
import io
import re
from pathlib import Path

from fastapi import FastAPI, Response
from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.image import load_image
from mmlm.serve.config import ServeConfig
from mmlm.serve.errors import APIError

THUMBNAIL_SIDE = 256  # pixels on the longer side; the page shows results at about 160
MAX_FILE_BYTES = 64 * 2**20  # an indexed file larger than this is not read for a thumbnail
_ROW_ID = re.compile(r"[0-9]{1,18}")  # fits SQLite's signed 64-bit INTEGER PRIMARY KEY
_SHA256 = re.compile(r"[0-9a-f]{64}")


def add_thumbnail_route(app: FastAPI, engine, config: ServeConfig) -> None:
    """Add GET /v1/search/thumbnail/{key} to `app`: a JPEG of the indexed image with that row id or hash."""

    @app.get("/v1/search/thumbnail/{key}")
    async def thumbnail(key: str) -> Response:
        """A JPEG at most THUMBNAIL_SIDE pixels on a side of one indexed image; 404 for anything else."""
        row = indexed_row(getattr(engine, "index", None), key)  # SQLite stays on the loop's thread
        data = await asyncio.to_thread(thumbnail_jpeg, row["path"], row["sha256"], config.max_image_pixels)
        return Response(
            data, media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600", "ETag": f'"{row["sha256"]}"'},
        )  # fmt: skip


def indexed_row(index, key: str) -> dict:
    """Return the index's metadata row for a row id or content hash; raise APIError (404) for any other key."""
    if index is None:
        raise APIError(404, "thumbnail: this server has no image index", code="no_index")
    row = None
    if _ROW_ID.fullmatch(key):
        row = index.metadata.rows([int(key)]).get(int(key))
    elif _SHA256.fullmatch(key):
        row = index.metadata.row_by_hash(key)
    if row is None:
        raise APIError(404, "thumbnail: no indexed image has that row id or content hash", code="not_found")
    return row


def thumbnail_jpeg(path: str, sha256: str, max_pixels: int) -> bytes:
    """Return a JPEG thumbnail of the file at an indexed `path`; 404 unless its bytes still hash to `sha256`."""
    file = Path(path)
    try:
        if file.stat().st_size > MAX_FILE_BYTES:
            raise APIError(404, f"thumbnail: the indexed file {path} is larger than {MAX_FILE_BYTES} bytes")
        data = file.read_bytes()
    except OSError:
        raise APIError(404, f"thumbnail: the indexed file {path} is gone", code="file_gone") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise APIError(404, f"thumbnail: the file {path} changed since it was indexed", code="file_changed")
    try:
        image = load_image(data, max_pixels=max_pixels)
    except (InputError, Image.DecompressionBombError):
        raise APIError(404, f"thumbnail: the indexed file {path} no longer decodes") from None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # keeps the aspect ratio; never enlarges
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
