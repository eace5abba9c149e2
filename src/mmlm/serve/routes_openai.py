"""OpenAI's chat completions (plain or streamed as server-sent events) and model list, over the served VLM."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mmlm.serve.chat_request import chat_messages, generation_settings, run_guard
from mmlm.serve.config import ServeConfig
from mmlm.serve.engine import GenerationStats
from mmlm.serve.errors import as_api_error, error_body
from mmlm.serve.guard import inspect_image
from mmlm.serve.images import load_request_images
from mmlm.serve.requests import ClosingStream, parse_body, until_disconnect
from mmlm.serve.schema import ChatRequest, chat_chunk, usage
from mmlm.serve.served_models import check_model, embed_model_ids


def add_openai_routes(app: FastAPI, engine, config: ServeConfig) -> None:
    """Add POST /v1/chat/completions and GET /v1/models to `app`."""
    created = int(time.time())
    vlm = getattr(engine, "vlm", None)
    has_embedder = bool(getattr(engine, "embedder", None))
    inspect = None
    if config.guard != "off":
        inspect = inspect_image

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | ClosingStream:
        """OpenAI chat completions over the served VLM, streamed as server-sent events when asked."""
        body = await parse_body(request, ChatRequest)
        model = check_model(body.model, [config.model_id if vlm is not None else None])
        settings = generation_settings(body, config)
        messages, urls, audio = chat_messages(body.messages, vlm)
        images = await load_request_images(urls, config)
        guard = await run_guard(messages, images, inspect, config.guard)
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        extension = {"mmlm": {"guard": guard}} if guard is not None else {}
        stats = GenerationStats()
        pieces = engine.generate(messages, images, settings, stats, audio)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            try:  # the first piece before the 200, so a full queue or a bad prompt still gets its status
                first = await until_disconnect(request, anext(pieces, None))
            except BaseException:
                await pieces.aclose()
                raise
            events = _chat_events(
                pieces, stats, first, reply_id, now, model, include_usage, extension
            )  # fmt: skip
            return ClosingStream(
                events, stats.stalled, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        chunks = await until_disconnect(request, _collect(pieces))
        text = "".join(chunks)
        return JSONResponse({
            "id": reply_id, "object": "chat.completion", "created": now, "model": model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": stats.finish_reason or "stop",
            }],
            "usage": usage(stats.prompt_tokens, stats.completion_tokens),
            **extension,
        })  # fmt: skip

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        """OpenAI's model list: the models this server answers for."""
        embed_ids = embed_model_ids(config, has_embedder)
        ids = [config.model_id] + [m for m in embed_ids if m and m != config.model_id]
        data = [{"id": i, "object": "model", "created": created, "owned_by": "mmlm"} for i in ids]
        return JSONResponse({"object": "list", "data": data})


async def _collect(pieces: AsyncIterator[str]) -> list[str]:
    try:
        return [piece async for piece in pieces]
    finally:
        await pieces.aclose()


async def _chat_events(
    pieces,
    stats,
    first,
    reply_id,
    created,
    model,
    include_usage,
    extension,
) -> AsyncIterator[str]:
    """Yield OpenAI chat.completion.chunk events, then `data: [DONE]`.

    When the client goes, Starlette cancels the response (ASGI HTTP spec < 2.4, which uvicorn speaks): the
    cancellation lands in the engine's generator, and `finally` closes it either way.
    """
    usage_none = {"usage": None} if include_usage else {}
    try:
        yield chat_chunk(reply_id, created, model, {"role": "assistant", "content": ""}, None, **usage_none)
        piece = first
        while piece is not None:
            if piece:
                yield chat_chunk(reply_id, created, model, {"content": piece}, None, **usage_none)
            piece = await anext(pieces, None)  # a disconnect cancels this await (Starlette)
        await pieces.aclose()  # the reply ended: the engine has filled `stats`
        yield chat_chunk(
            reply_id, created, model, {}, stats.finish_reason or "stop", **usage_none, **extension
        )
        if include_usage:
            final = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": usage(stats.prompt_tokens, stats.completion_tokens)}  # fmt: skip
            yield f"data: {json.dumps(final)}\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as error:  # after the 200 the status cannot change; OpenAI sends the error as an event
        api_error = as_api_error(error)
        yield f"data: {json.dumps(error_body(api_error.status, api_error.message, api_error.param, api_error.code))}\n\n"
    finally:
        await pieces.aclose()
    yield "data: [DONE]\n\n"
