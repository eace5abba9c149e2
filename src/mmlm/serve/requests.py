"""The request plumbing of `mmlm serve`: the ASGI gate (API key, body-size cap, request counts), body parsing
into the wire schema, racing engine work against the client's disconnect, and cutting off a stream whose
client stopped reading."""

import asyncio
import hmac
import json
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from mmlm.serve.config import ServeConfig
from mmlm.serve.drain import Drain
from mmlm.serve.errors import APIError, error_body, validation_error

# paths counted by name in mmlm_http_requests_total; anything else counts as "other"
_COUNTED_PATHS = (
    "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/classify", "/v1/search", "/health", "/metrics",
)  # fmt: skip
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class RequestGate:
    """ASGI middleware at the door: the API key, the body-size cap (declared and as read), request counts, and
    while the server drains (SIGTERM) a 503 for every new request and the count of those still in flight."""

    def __init__(self, app, config: ServeConfig, counts: dict[tuple[str, str], int], drain: Drain) -> None:
        self.app, self.config, self.counts, self.drain = app, config, counts, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = {"code": 500}

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.drain.in_flight += 1
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_error(counted_send, refusal)
                return
            await self.app(scope, self._capped(receive), counted_send)
        finally:
            self.drain.in_flight -= 1
            key = (path if path in _COUNTED_PATHS else "other", str(status["code"]))
            self.counts[key] = self.counts.get(key, 0) + 1

    def _refusal(self, scope) -> APIError | None:
        if self.drain.draining:  # /health too, so a load balancer stops sending here
            return APIError(
                503, "the server is shutting down; retry on another replica or after it restarts",
                code="server_draining", headers={"Retry-After": "1"},
            )  # fmt: skip
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.config.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.config.api_key.encode()
            ):
                message = "missing API key" if not given else "invalid API key"
                return APIError(
                    401, f"{message}; send 'Authorization: Bearer <key>'", code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="mmlm"'},
                )  # fmt: skip
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.config.max_request_bytes):
            return _too_large(self.config)
        return None

    def _capped(self, receive):
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.config.max_request_bytes:
                    raise _too_large(self.config)
            return message

        return capped_receive


def _too_large(config: ServeConfig) -> APIError:
    return APIError(
        413, f"the request body is larger than the server's limit of {config.max_request_bytes} bytes",
        code="request_too_large",
    )  # fmt: skip


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error_body(error.status, error.message, error.param, error.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def parse_body(request: Request, model: type[M]) -> M:
    """Return the request body validated as `model`; malformed JSON and refused fields are 400s."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as error:  # also bad UTF-8 and integers of more digits than Python parses
        raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is JSON nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its engine work has been cancelled."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Return the result of `work`, or cancel it and raise ClientGone when the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the engine work unwind before anyone closes its generator
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClosingStream(StreamingResponse):
    """A streamed response that is cut off (the connection closed) as soon as `stalled` is set.

    The engine sets it when the client read nothing while its stream buffer filled; the response is then stuck
    sending to a socket nobody reads, so only cancelling it frees the connection (uvicorn closes it).
    """

    def __init__(self, content, stalled: asyncio.Event, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.stalled = stalled

    async def __call__(self, scope, receive, send) -> None:
        """Send the stream until it ends or `stalled` is set, whichever comes first."""
        response = asyncio.ensure_future(super().__call__(scope, receive, send))
        stalled = asyncio.ensure_future(self.stalled.wait())
        try:
            await asyncio.wait({response, stalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stalled.cancel()
            if not response.done():
                response.cancel()
                await asyncio.wait({response})
        if not response.cancelled():
            response.result()
