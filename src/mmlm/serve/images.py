"""Images from requests: data URLs, and http(s) URLs only when the server allows them, from allow-listed hosts.

Size is checked from the image header before any pixel is decoded (`load_image(max_pixels=...)`), so a
decompression bomb costs a header read. Remote fetches never follow redirects on their own: every hop's host
must be allow-listed and resolve only to public addresses (no loopback, private, link-local, reserved ...),
the body is read up to a byte cap, and each hop has a timeout. Local paths and file:// URLs are never read.

Each hop's host is resolved once, and the connection goes to the exact socket address that passed the check
(TLS still verifies the certificate against the host name), so a DNS server that answers differently the
second time (DNS rebinding) cannot steer the fetch to a private address.
"""

import asyncio
import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse

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


def resolve(host: str, port: int) -> list[tuple]:
    """Return every (family, socket address) `host` resolves to, for TCP."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({(family, address) for family, _, _, _, address in infos})


def _check_hop(url: str, field: str, config: ServeConfig) -> tuple:
    """Return the (family, socket address) to fetch `url` from, after the allow-list and public-address checks."""
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
    except (OSError, UnicodeError, ValueError):
        raise APIError(
            400, f"{field}: cannot resolve {parts.hostname!r}", param=field, code="image_fetch_failed"
        ) from None
    private = [address[0] for _, address in addresses if not public_address(address[0])]
    if private or not addresses:
        raise APIError(
            400, f"{field}: {parts.hostname!r} resolves to a non-public address ({', '.join(private)}); refused",
            param=field, code="image_url_refused",
        )  # fmt: skip
    return addresses[0]


class PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one checked socket address; the URL's host names the Host header and TLS peer."""

    def __init__(self, url: str, family: int, address: tuple, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.default_port = 443 if parts.scheme == "https" else 80  # so Host omits a default port
        super().__init__(parts.hostname, parts.port or self.default_port, timeout=timeout)
        self.family, self.address = family, address
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None

    def connect(self) -> None:
        """Connect to the checked address itself: no name is resolved here (the rebinding window)."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock
        except BaseException:
            sock.close()
            raise


def fetch_remote(url: str, field: str, config: ServeConfig) -> bytes:
    """Return the body of an allowed http(s) URL, following at most `remote_max_redirects` checked hops."""
    for _ in range(config.remote_max_redirects + 1):
        family, address = _check_hop(url, field, config)
        parts = urllib.parse.urlsplit(url)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection = PinnedConnection(url, family, address, config.remote_timeout_s)
        try:
            connection.request("GET", target, headers={"User-Agent": "mmlm-serve", "Accept": "image/*"})
            response = connection.getresponse()
            location = response.getheader("Location") if 300 <= response.status < 400 else None
            if location is not None:
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise APIError(
                    400, f"{field}: fetching the image got HTTP {response.status}", param=field,
                    code="image_fetch_failed",
                )  # fmt: skip
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > config.remote_max_bytes:
                raise _too_big(field, config)
            return _read_capped(response, field, config)
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise APIError(
                400, f"{field}: fetching the image failed ({error})", param=field, code="image_fetch_failed"
            ) from None
        finally:
            connection.close()
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
