"""Images from requests: data URLs, and http(s) URLs only when the server allows them, from allow-listed hosts.

Size is checked from the image header before any pixel is decoded (`load_image(max_pixels=...)`), so a
decompression bomb costs a header read. Remote fetches never follow redirects on their own: every hop's host
must be allow-listed and resolve only to public addresses (no loopback, private, link-local, reserved ...),
the body is read up to a byte cap, and each hop has a timeout. Local paths and file:// URLs are never read.

Known gap: the address is checked when the host is resolved, and urllib resolves again when it connects, so a
DNS server that answers differently the second time (DNS rebinding) is not stopped; allow-list hosts you trust.
"""

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image

from mmlm.errors import InputError
from mmlm.processing.image import load_image
from mmlm.serve.config import ServeConfig
from mmlm.serve.errors import APIError

_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)


def decode_data_url(url: str, field: str) -> bytes:
    """Return the bytes of a base64 image data URL; raise APIError (400) naming `field` otherwise."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise APIError(400, f"{field}: expected a base64 data URL (data:image/png;base64,...)", param=field)
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"{field}: the data URL holds {mime!r}; expected an image/* type", param=field)
    payload = "".join(url[match.end() :].split())  # MIME-style line breaks are allowed
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(400, f"{field}: the data URL is not valid base64 ({error})", param=field) from None
    if not data:
        raise APIError(400, f"{field}: the data URL is empty; expected an encoded image", param=field)
    return data


def decode_image(data: bytes, field: str, config: ServeConfig) -> Image.Image:
    """Return encoded image bytes as an RGB PIL image, refusing oversized ones from the header (400 / 413)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only
            width, height = probe.size
    except Image.DecompressionBombError as error:
        raise APIError(413, f"{field}: {error}", param=field, code="image_too_large") from None
    except (OSError, SyntaxError, ValueError):
        raise APIError(
            400, f"{field}: not a readable image; expected PNG, JPEG, WebP, GIF ...", param=field
        ) from None
    if width * height > config.max_image_pixels:
        raise APIError(
            413, f"{field}: the image is {width}x{height} = {width * height} pixels; the server accepts at most "
            f"{config.max_image_pixels}", param=field, code="image_too_large",
        )  # fmt: skip
    try:
        return load_image(data, max_pixels=config.max_image_pixels)
    except InputError as error:
        raise APIError(400, f"{field}: {str(error).removeprefix('<bytes>: ')}", param=field) from None
    except Image.DecompressionBombError as error:
        raise APIError(413, f"{field}: {error}", param=field, code="image_too_large") from None


def image_bytes(url: str, field: str, config: ServeConfig) -> bytes:
    """Return the encoded bytes an image_url points at: a data URL, or an allowed remote http(s) URL."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, field)
    if scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise APIError(
                400, f"{field}: remote image URLs are disabled on this server; send a base64 data URL",
                param=field, code="remote_images_disabled",
            )  # fmt: skip
        return fetch_remote(url, field, config)
    raise APIError(
        400, f"{field}: expected a data URL (data:image/...;base64,...) or an http(s) URL; local paths and "
        "file:// URLs are never read", param=field, code="unsupported_image_url",
    )  # fmt: skip


def load_request_image(url: str, field: str, config: ServeConfig) -> Image.Image:
    """Return the PIL image of an image_url (blocking: run it in a worker thread)."""
    return decode_image(image_bytes(url, field, config), field, config)


async def load_request_images(urls: list[tuple[str, str]], config: ServeConfig) -> list[Image.Image]:
    """Return the PIL images of (url, field) pairs, each read in a worker thread, after the per-request cap."""
    if len(urls) > config.max_images:
        raise APIError(
            400, f"the request has {len(urls)} images; the server accepts at most {config.max_images}",
            param="messages", code="too_many_images",
        )  # fmt: skip
    return [await asyncio.to_thread(load_request_image, url, field, config) for url, field in urls]


def host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """Return whether `host` is one of `domains` or a sub-domain of one."""
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains))


def public_address(address: str) -> bool:
    """Return whether an IP address is globally routable (not private, loopback, link-local, reserved ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private)


def resolve(host: str, port: int) -> list[str]:
    """Return every address `host` resolves to."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def _check_hop(url: str, field: str, config: ServeConfig) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise APIError(
            400, f"{field}: {url!r} is not an http(s) URL", param=field, code="unsupported_image_url"
        )
    if parts.username or parts.password:
        raise APIError(
            400, f"{field}: URLs with credentials are refused", param=field, code="image_url_refused"
        )
    if not host_allowed(parts.hostname, config.allowed_domains):
        raise APIError(
            400, f"{field}: host {parts.hostname!r} is not on the server's allow-list", param=field,
            code="image_url_refused",
        )  # fmt: skip
    try:
        addresses = resolve(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        raise APIError(
            400, f"{field}: cannot resolve {parts.hostname!r}", param=field, code="image_fetch_failed"
        ) from None
    private = [a for a in addresses if not public_address(a)]
    if private or not addresses:
        raise APIError(
            400, f"{field}: {parts.hostname!r} resolves to a non-public address ({', '.join(private)}); refused",
            param=field, code="image_url_refused",
        )  # fmt: skip


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - each hop is checked by us
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def fetch_remote(url: str, field: str, config: ServeConfig) -> bytes:
    """Return the body of an allowed http(s) URL, following at most `remote_max_redirects` checked hops."""
    for _ in range(config.remote_max_redirects + 1):
        _check_hop(url, field, config)
        request = urllib.request.Request(url, headers={"User-Agent": "mmlm-serve", "Accept": "image/*"})
        try:
            with _OPENER.open(request, timeout=config.remote_timeout_s) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > config.remote_max_bytes:
                    raise _too_big(field, config)
                return _read_capped(response, field, config)
        except urllib.error.HTTPError as error:
            location = error.headers.get("Location") if 300 <= error.code < 400 else None
            if location is None:
                raise APIError(
                    400,
                    f"{field}: fetching the image got HTTP {error.code}",
                    param=field,
                    code="image_fetch_failed",
                ) from None
            url = urllib.parse.urljoin(url, location)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise APIError(
                400, f"{field}: fetching the image failed ({error})", param=field, code="image_fetch_failed"
            ) from None
    raise APIError(
        400,
        f"{field}: more than {config.remote_max_redirects} redirects",
        param=field,
        code="image_fetch_failed",
    )


def _read_capped(response, field: str, config: ServeConfig) -> bytes:
    # the socket timeout bounds each read; this deadline bounds them all, against a server that trickles
    deadline = time.monotonic() + config.remote_timeout_s
    chunks, size = [], 0
    while chunk := response.read1(64 * 1024) if hasattr(response, "read1") else response.read(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > config.remote_max_bytes:
            raise _too_big(field, config)
        if time.monotonic() > deadline:
            raise APIError(
                400, f"{field}: the image did not arrive within {config.remote_timeout_s:g} s", param=field,
                code="image_fetch_failed",
            )  # fmt: skip
    return b"".join(chunks)


def _too_big(field: str, config: ServeConfig) -> APIError:
    return APIError(
        413, f"{field}: the remote image is larger than {config.remote_max_bytes} bytes", param=field,
        code="image_too_large",
    )  # fmt: skip
