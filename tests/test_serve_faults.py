"""A server that holds: DNS rebinding cannot reach a private address, a client that stops reading cannot grow
the server's memory or block the batch, and SIGTERM drains in-flight requests before the process exits."""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from test_serve_api import image_host, png
from test_serve_engine import run

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.inference.generation import GenerationSettings
from mmlm.serve.config import ServeConfig
from mmlm.serve.engine import Engine, EngineConfig, GenerationStats, StreamStalled
from mmlm.serve.errors import APIError
from mmlm.serve.images import fetch_remote
from mmlm.serve.requests import ClosingStream

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


# --- a client that stops reading: a bounded stream buffer, then the stream is closed and the row dropped -----


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    write_tiny_llava(folder)
    return folder


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_a_stream_nobody_reads_is_ended_and_its_row_leaves_the_batch(vlm_dir, caplog):
    vlm = mmlm.load(vlm_dir)
    story, other = user("Tell a long story please about cats"), user("Hi")
    settings = GenerationSettings(max_new_tokens=40)
    expected_other = vlm.generate(other, [], max_new_tokens=40)
    engine = Engine(vlm=vlm, config=EngineConfig(max_batch=4, stream_buffer=3))

    async def body():
        stats = GenerationStats()
        stuck = engine.generate(story, [], settings, stats)
        await anext(stuck)  # the client reads one piece, then nothing
        reader = asyncio.ensure_future(_collect(engine.generate(other, [], settings)))
        await asyncio.wait_for(stats.stalled.wait(), 30)
        text = await asyncio.wait_for(reader, 30)  # the batch went on without the stuck row
        late = []
        with pytest.raises(StreamStalled):
            async for piece in stuck:
                late.append(piece)
        return stats, late, text

    with caplog.at_level(logging.WARNING, logger="mmlm.serve"):
        stats, late, text = run(engine, body)
    assert len(late) <= 3  # the buffer held no more than stream_buffer pieces
    assert stats.completion_tokens <= 5 < 40  # decoding stopped for it once the buffer was full
    assert text == expected_other
    assert any("stream_buffer" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert 'mmlm_requests_total{kind="generate",status="stalled"} 1' in engine.metrics_text()


async def _collect(pieces) -> str:
    return "".join([piece async for piece in pieces])


def test_a_stalled_stream_closes_its_response_though_the_socket_is_stuck():
    closed, stalled = asyncio.Event(), asyncio.Event()

    async def events():
        try:
            while True:
                yield "data: {}\n\n"
        finally:
            closed.set()

    async def stuck_send(message) -> None:  # a client that reads nothing: the first body send never returns
        if message["type"] == "http.response.body":
            stalled.set()  # what the engine does once the stream's buffer is full
            await asyncio.Event().wait()

    async def never_disconnects():
        await asyncio.Event().wait()

    async def main() -> float:
        started = time.monotonic()
        response = ClosingStream(events(), stalled, media_type="text/event-stream")
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
        await asyncio.wait_for(response(scope, never_disconnects, stuck_send), 5)
        return time.monotonic() - started

    assert asyncio.run(main()) < 2
    assert closed.is_set()


# --- SIGTERM drains `mmlm serve` ------------------------------------------------------------------------

# `mmlm serve` itself, with each decode step slowed so a request is reliably in flight when SIGTERM arrives
SLOW_SERVE = """
import sys, time
from mmlm.cli import main
from mmlm.serve.engine import Engine
advance = Engine._advance
Engine._advance = lambda self, *args: (time.sleep(float(sys.argv[1])), advance(self, *args))[1]
sys.exit(main(sys.argv[2:]))
"""


@contextmanager
def serve_process(model: str, step_seconds: float, drain_seconds: float):
    """Start `mmlm serve` in a subprocess on 127.0.0.1; yield (process, base URL) once /health answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = str(Path(mmlm.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = [
        "serve",
        "--model",
        model,
        "--model-name",
        "llava",
        "--port",
        str(port),
        "--drain-seconds",
        str(drain_seconds),
    ]
    process = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, str(step_seconds), *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def stream_chat(url: str, max_tokens: int, first: threading.Event, lines: list[str]) -> None:
    """POST a streamed chat request, set `first` at its first event, and collect every event line."""
    # greedy: a sampled reply may end at an eos before max_tokens, and the tests count on the full length
    body = {"model": "llava", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": user("Tell a long story")}  # fmt: skip
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()
    except httpx.TransportError as error:
        lines.append(f"cut off: {error!r}")
    first.set()


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits(vlm_dir):
    with serve_process(str(vlm_dir), step_seconds=0.05, drain_seconds=20) as (process, url):
        first, lines = threading.Event(), []
        reader = threading.Thread(target=stream_chat, args=(url, 40, first, lines))  # about 2 s of decoding
        reader.start()
        assert first.wait(30)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        refused = httpx.get(url + "/v1/models", timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
        assert reader.join(30) is None and lines[-1] == "data: [DONE]", lines[-3:]
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # all 40 tokens, not cut off
        assert process.wait(15) == 0 and time.monotonic() - signalled < 15


@pytest.mark.slow
def test_the_drain_deadline_bounds_the_exit(vlm_dir):
    with serve_process(str(vlm_dir), step_seconds=0.2, drain_seconds=1) as (process, url):
        first, lines = threading.Event(), []
        reader = threading.Thread(target=stream_chat, args=(url, 100, first, lines))  # about 20 s of decoding
        reader.start()
        assert first.wait(30)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        process.wait(15)
        assert time.monotonic() - signalled < 5  # 1 s of drain, uvicorn's 1 s grace, the engine's stop
        reader.join(10)
        assert lines[-1] != "data: [DONE]"
