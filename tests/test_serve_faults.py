"""A server that holds: DNS rebinding cannot reach a private address, a client that stops reading cannot grow
the server's memory or block the batch, and SIGTERM drains in-flight requests before the process exits."""

import socket
from contextlib import contextmanager

import pytest
from test_serve_api import image_host, png

from mmlm.serve.config import ServeConfig
from mmlm.serve.errors import APIError
from mmlm.serve.images import fetch_remote

# --- remote images: the checked address is the one connected to ------------------------------------------


@contextmanager
def rebinding_dns(monkeypatch, host: str, answers: list[str]):
    """Answer getaddrinfo for `host` with `answers` in turn (the last one repeats); yield the calls made."""
    real = socket.getaddrinfo
    calls = []

    def fake(name, port, *args, **kwargs):
        if name != host:
            return real(name, port, *args, **kwargs)
        calls.append(name)
        address = answers[min(len(calls), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield calls


def test_a_rebinding_resolver_never_steers_the_fetch_to_a_private_address(monkeypatch):
    # 127.0.0.1 plays a public address, 127.0.0.2 a private one that answers with a secret
    monkeypatch.setattr("mmlm.serve.images.public_address", lambda address: address == "127.0.0.1")
    image = png(8, 8)
    config = ServeConfig(allow_remote_images=True, allowed_domains=("images.test",))
    asked = []
    secret = {"/cat.png": (200, {}, b"secret"), "/redirect": (200, {}, b"secret")}
    with image_host({"/cat.png": (200, {}, image)}) as public, image_host(secret, "127.0.0.2", asked) as _:
        port = public.rsplit(":", 1)[1]
        # the check sees 127.0.0.1; a second lookup (a connect that resolves again) would see 127.0.0.2
        with rebinding_dns(monkeypatch, "images.test", ["127.0.0.1", "127.0.0.2"]) as calls:
            assert fetch_remote(f"http://images.test:{port}/cat.png", "url", config) == image
        assert calls == ["images.test"] and asked == []


def test_a_redirect_to_a_host_that_resolves_privately_is_refused(monkeypatch):
    monkeypatch.setattr("mmlm.serve.images.public_address", lambda address: address == "127.0.0.1")
    config = ServeConfig(allow_remote_images=True, allowed_domains=("images.test", "inside.test"))
    asked = []
    with image_host({}, "127.0.0.2", asked) as private:
        port = private.rsplit(":", 1)[1]
        hop = {"/hop": (302, {"Location": f"http://inside.test:{port}/secret"}, b"")}
        with image_host(hop) as public, rebinding_dns(monkeypatch, "inside.test", ["127.0.0.2"]):
            monkeypatch.setattr(socket, "getaddrinfo", _also(socket.getaddrinfo, "images.test", "127.0.0.1"))
            with pytest.raises(APIError) as refused:
                fetch_remote(public.replace("127.0.0.1", "images.test") + "/hop", "url", config)
    assert refused.value.status == 400 and refused.value.code == "image_url_refused"
    assert "inside.test" in refused.value.message and "127.0.0.2" in refused.value.message
    assert asked == []


def _also(resolver, host: str, address: str):
    """Return `resolver` that also answers `host` with `address`."""

    def fake(name, port, *args, **kwargs):
        if name == host:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return resolver(name, port, *args, **kwargs)

    return fake
