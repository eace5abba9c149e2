"""Thumbnails of search results: served for rows of the index only, by row id or content hash, never by path."""

import hashlib
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve_api import serving

from mmlm.index import ImageIndex, ImageRecord
from mmlm.serve.engine import Engine
from mmlm.serve.thumbnails import THUMBNAIL_SIDE

DIM = 8


def write_image(path, size, colour, fmt="PNG") -> str:
    """Write a one-colour image; return its SHA-256 as the index stores it."""
    Image.new("RGB", size, colour).save(path, format=fmt)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def indexed(tmp_path):
    """An index of two images (a wide PNG, a small JPEG) beside a secret image that is not indexed."""
    images = tmp_path / "images"
    images.mkdir()
    files = {"wide.png": ((400, 200), (220, 20, 20), "PNG"), "small.jpg": ((50, 30), (20, 200, 40), "JPEG")}
    records = []
    for name, (size, colour, fmt) in files.items():
        sha = write_image(images / name, size, colour, fmt)
        records.append(ImageRecord(str(images / name), sha, *size, caption=name))
    secret = tmp_path / "secret.png"
    write_image(secret, (64, 64), (1, 2, 3))
    with ImageIndex.create(tmp_path / "index", DIM) as index:
        ids = index.add(records, np.eye(len(records), DIM, dtype=np.float32))
    keys = [(int(i), r.sha256) for i, r in zip(ids, records, strict=True)]
    return tmp_path / "index", dict(zip(files, keys, strict=True))


def thumbnail_server(index_dir, **settings):
    """Serve an Engine holding only the index (opened in the server's thread, as SQLite wants)."""
    return serving(lambda: Engine(index=ImageIndex.open(index_dir)), **settings)


def decoded(response: httpx.Response) -> Image.Image:
    """Return a thumbnail response's image after checking its status and content type."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    return Image.open(io.BytesIO(response.content))


def test_a_thumbnail_of_an_indexed_image_by_row_id_or_hash(indexed):
    index_dir, rows = indexed
    with thumbnail_server(index_dir) as url:
        wide_id, wide_sha = rows["wide.png"]
        by_id = decoded(httpx.get(f"{url}/v1/search/thumbnail/{wide_id}"))
        assert by_id.format == "JPEG" and by_id.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 2)
        red = by_id.convert("RGB").getpixel((10, 10))
        assert abs(red[0] - 220) < 8 and red[1] < 40 and red[2] < 40
        assert decoded(httpx.get(f"{url}/v1/search/thumbnail/{wide_sha}")).size == by_id.size
        small_id, _ = rows["small.jpg"]
        assert decoded(httpx.get(f"{url}/v1/search/thumbnail/{small_id}")).size == (50, 30)  # never enlarged


KEYS = [
    "999999",  # no such row
    "0" * 64,  # no such hash
    "wide.png",  # an indexed file's name is not a key
    "-1",
    "1.0",
    "%2E%2E%2Fsecret.png",
    "..%2F..%2Fsecret.png",
    "%2Fetc%2Fpasswd",
    "..%5C..%5Csecret.png",
    "1%00",
    "1%2F..%2F..%2Fsecret.png",
]


def test_unknown_and_path_like_keys_are_404(indexed):
    index_dir, _ = indexed
    with thumbnail_server(index_dir) as url:
        for key in KEYS:
            response = httpx.get(f"{url}/v1/search/thumbnail/{key}")
            assert response.status_code == 404, (key, response.text)
            assert not response.headers["content-type"].startswith("image/")


def test_traversal_cannot_read_a_file_outside_the_index(indexed, tmp_path):
    index_dir, _ = indexed
    secret = (tmp_path / "secret.png").read_bytes()
    secret_sha = hashlib.sha256(secret).hexdigest()
    with thumbnail_server(index_dir) as url, httpx.Client(base_url=url) as client:
        raw_paths = [
            f"/v1/search/thumbnail/{secret_sha}",  # a real image's hash, but not an indexed one
            f"/v1/search/thumbnail/{tmp_path}/secret.png",
            "/v1/search/thumbnail/../../../secret.png",
            "/v1/search/thumbnail/..%2F..%2F..%2Fsecret.png",
            f"/v1/search/thumbnail/%2F{str(tmp_path).lstrip('/').replace('/', '%2F')}%2Fsecret.png",
            f"/v1/search/thumbnail/file:{tmp_path}/secret.png",
        ]
        for raw in raw_paths:  # sent as written: httpx would otherwise normalise the dots away
            request = client.build_request("GET", url)
            request.url = request.url.copy_with(raw_path=raw.encode())
            response = client.send(request)
            assert response.status_code == 404, (raw, response.status_code)
            assert response.content != secret and b"\x01\x02\x03" not in response.content


def test_a_vanished_or_swapped_file_is_404_with_one_line(indexed, tmp_path):
    index_dir, rows = indexed
    wide, small = tmp_path / "images" / "wide.png", tmp_path / "images" / "small.jpg"
    wide.unlink()
    small.unlink()
    os.symlink(tmp_path / "secret.png", small)  # the indexed path now leads to another image
    with thumbnail_server(index_dir) as url:
        gone = httpx.get(f"{url}/v1/search/thumbnail/{rows['wide.png'][0]}")
        assert gone.status_code == 404
        message = gone.json()["error"]["message"]
        assert "gone" in message and str(wide) in message and "\n" not in message
        swapped = httpx.get(f"{url}/v1/search/thumbnail/{rows['small.jpg'][1]}")
        assert (
            swapped.status_code == 404
            and "changed since it was indexed" in swapped.json()["error"]["message"]
        )


def test_thumbnails_need_the_api_key_and_an_index(indexed):
    index_dir, rows = indexed
    with thumbnail_server(index_dir, api_key="sk-thumb") as url:
        path = f"{url}/v1/search/thumbnail/{rows['wide.png'][0]}"
        assert httpx.get(path).status_code == 401
        assert decoded(httpx.get(path, headers={"Authorization": "Bearer sk-thumb"})).width == THUMBNAIL_SIDE
    with serving(Engine()) as url:
        response = httpx.get(f"{url}/v1/search/thumbnail/1")
        assert response.status_code == 404 and response.json()["error"]["code"] == "no_index"
