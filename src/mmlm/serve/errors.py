"""Every failure the server reports, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.

Bad requests are 4xx; a 5xx means a fault of ours, and it is still answered in the same shape so the worker
stays up and the official client raises a readable error.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmlm.errors import InputError
from mmlm.serve.engine import QueueFull, RequestTimeout

log = logging.getLogger("mmlm.serve")

# OpenAI's `type` for each status the server sends
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """A request the server refuses or cannot finish: an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Return OpenAI's error object for a status and message."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    """Return the JSON response of an APIError."""
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def as_api_error(error: BaseException) -> APIError:
    """Return the APIError for an exception raised while serving: ours, bad input, a full queue, a timeout."""

    if isinstance(error, APIError):
        return error
    if isinstance(error, InputError):
        return APIError(400, str(error), code="invalid_input")
    if isinstance(error, QueueFull):
        retry = max(1, round(float(getattr(error, "retry_after", 1.0)) + 0.499))
        return APIError(
            429, f"the request queue is full; retry after {retry} s", code="queue_full",
            headers={"Retry-After": str(retry)},
        )  # fmt: skip
    if isinstance(error, RequestTimeout):
        return APIError(504, f"the request timed out in the engine: {error}".rstrip(": "), code="timeout")
    log.exception("unexpected error while serving a request", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", code="internal_error")


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if error.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", param
    if error.get("type") == "union_tag_invalid":
        return f"{param}: {error.get('msg')}", param
    return (f"{param}: {error.get('msg')}" if param else str(error.get("msg"))), param


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Return a 400 APIError naming the first field pydantic refused."""
    if not errors:
        return APIError(400, "invalid request")
    message, param = _validation_message(errors[0])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code="invalid_request")


def add_error_handlers(app: FastAPI) -> None:
    """Answer every exception in OpenAI's error shape."""

    async def on_api_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(as_api_error(error))

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return error_response(validation_error(list(error.errors())))

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        headers = dict(error.headers or {})
        return error_response(APIError(error.status_code, str(error.detail), headers=headers))

    for kind in (APIError, InputError, QueueFull, RequestTimeout, Exception):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
