"""The HTTP app of `mmlm serve`: OpenAI-compatible chat completions and embeddings, plus mmlm's classify and search.

Requests are checked at this boundary (schema, size, images, limits, key) and handed to the Engine, which
batches and runs the models. Every refusal is a 4xx in OpenAI's error shape (`mmlm.serve.errors`). A client
that goes away cancels its engine work: each engine call races the client's disconnect.
"""

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from PIL import Image

from mmlm.inference.generation import GenerationSettings
from mmlm.processing.chat import AUDIO_TOKEN, IMAGE_TOKEN
from mmlm.serve.config import ServeConfig
from mmlm.serve.engine import GenerationStats
from mmlm.serve.errors import APIError, add_error_handlers, as_api_error, error_body
from mmlm.serve.images import load_request_image
from mmlm.serve.metrics import format_labels
from mmlm.serve.requests import ClientGone, RequestGate, parse_body, until_disconnect
from mmlm.serve.schema import (
    AudioPart,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    EmbeddingRequest,
    ImagePart,
    SearchRequest,
    chat_chunk,
    embedding_value,
    usage,
)

STATIC = Path(__file__).parent / "static"


def create_app(engine, config: ServeConfig) -> FastAPI:
    """Return the FastAPI app serving `engine` under the limits of `config`; it starts and stops the engine."""
    config.check()
    inspect = None
    if config.guard != "off":
        from mmlm.serve.guard import GUARD_SYSTEM_NOTE, inspect_image

        inspect = inspect_image

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="mmlm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config
    counts: dict[tuple[str, str], int] = {}
    add_error_handlers(app)

    async def on_client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it

    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_middleware(RequestGate, config=config, counts=counts)
    created = int(time.time())
    vlm = getattr(engine, "vlm", None)
    embedder = getattr(engine, "embedder", None)
    index = getattr(engine, "index", None)

    def check_model(name: str | None, served: list[str | None]) -> str:
        served = [s for s in served if s]
        if not served:
            raise APIError(
                400, "this server has no model for this endpoint", param="model", code="model_not_found"
            )
        if name is not None and name not in served:
            raise APIError(
                404, f"model {name!r} is not served here; this endpoint serves {', '.join(served)}",
                param="model", code="model_not_found",
            )  # fmt: skip
        return name or served[0]

    def embed_model_ids() -> list[str | None]:
        return [config.embed_model_id] if config.embed_model_id else ([config.model_id] if embedder else [])

    async def load_images(urls: list[tuple[str, str]]) -> list[Image.Image]:
        if len(urls) > config.max_images:
            raise APIError(
                400, f"the request has {len(urls)} images; the server accepts at most {config.max_images}",
                param="messages", code="too_many_images",
            )  # fmt: skip
        return [await asyncio.to_thread(load_request_image, url, field, config) for url, field in urls]

    def chat_messages(
        messages: list[ChatMessage],
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[bytes]]:
        """Map OpenAI messages to mmlm chat messages (image and audio parts in order), the image URLs they name
        and the audio files they carry."""
        out, urls, audio = [], [], []
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content if message.content is not None else ""
            if isinstance(content, str):
                _no_image_token(content, f"messages.{i}.content")
                out.append({"role": role, "content": content})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                field = f"messages.{i}.content.{j}"
                if isinstance(part, ImagePart):
                    if role != "user":
                        raise APIError(
                            400, f"{field}: images are accepted in user messages only", param=field
                        )
                    urls.append((part.image_url.url, f"{field}.image_url.url"))
                    parts.append({"type": "image"})
                elif isinstance(part, AudioPart):
                    audio.append(audio_bytes(part, field, role))
                    parts.append({"type": "audio"})
                else:
                    _no_image_token(part.text, f"{field}.text")
                    parts.append({"type": "text", "text": part.text})
            out.append({"role": role, "content": parts})
        return out, urls, audio

    def audio_bytes(part: AudioPart, field: str, role: str) -> bytes:
        """Return an input_audio part's file bytes, or a 400 naming the field."""
        if role != "user":
            raise APIError(400, f"{field}: audio is accepted in user messages only", param=field)
        if vlm is None or not vlm.model.audio_tokens:
            raise APIError(
                400, f"{field}: the served model has no audio tower; send text and images",
                param=field, code="unsupported_content",
            )  # fmt: skip
        try:
            return base64.b64decode(part.input_audio.data, validate=True)
        except ValueError:
            raise APIError(
                400, f"{field}.input_audio.data: not valid base64", param=f"{field}.input_audio.data"
            ) from None

    async def run_guard(messages: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, Any] | None:
        if inspect is None or not images:
            return None
        verdicts = [await asyncio.to_thread(inspect, image) for image in images]
        flagged = [v for v in verdicts if v.flagged]
        report = {
            "flagged": bool(flagged),
            "score": max(v.score for v in verdicts),
            "reasons": sorted({r for v in verdicts for r in v.reasons}),
        }
        if flagged and config.guard == "strict":
            raise APIError(
                400, "an image reads as instructions to the assistant (possible prompt injection); refused: "
                + "; ".join(report["reasons"]), param="messages", code="prompt_injection_suspected",
            )  # fmt: skip
        if flagged:
            if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
                messages[0] = {
                    "role": "system",
                    "content": messages[0]["content"] + "\n\n" + GUARD_SYSTEM_NOTE,
                }
            else:
                messages.insert(0, {"role": "system", "content": GUARD_SYSTEM_NOTE})
        return report

    def settings_of(body: ChatRequest) -> GenerationSettings:
        if body.n not in (None, 1):
            raise APIError(
                400, f"n: only n=1 is supported, got {body.n}", param="n", code="unsupported_value"
            )
        max_tokens = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if max_tokens is not None and max_tokens > config.max_tokens_cap:
            raise APIError(
                400, f"{field}: {max_tokens} is above the server's cap of {config.max_tokens_cap}",
                param=field, code="max_tokens_too_large",
            )  # fmt: skip
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        settings = GenerationSettings(
            max_new_tokens=max_tokens or min(config.default_max_tokens, config.max_tokens_cap),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k, top_p=body.top_p, stop=stop, seed=body.seed,
        )  # fmt: skip
        settings.check()
        return settings

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        """OpenAI chat completions over the served VLM, streamed as server-sent events when asked."""
        body = await parse_body(request, ChatRequest)
        model = check_model(body.model, [config.model_id if vlm is not None else None])
        settings = settings_of(body)
        messages, urls, audio = chat_messages(body.messages)
        images = await load_images(urls)
        guard = await run_guard(messages, images)
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
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
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

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        """OpenAI embeddings of texts (`input`) or of the image and text parts of vLLM-style `messages`."""
        body = await parse_body(request, EmbeddingRequest)
        model = check_model(body.model, embed_model_ids())
        has_input = body.input not in (None, "", [])  # the client sends input=[] beside extra_body messages
        if has_input == (body.messages is not None):
            raise APIError(
                400, "give exactly one of input (texts) or messages (image_url parts)", param="input"
            )
        if has_input:
            texts = [body.input] if isinstance(body.input, str) else body.input
            if not texts or any(not t for t in texts):
                raise APIError(400, "input: expected non-empty strings", param="input")
            if len(texts) > config.max_embedding_inputs:
                raise APIError(
                    400, f"input: {len(texts)} texts; the server accepts at most {config.max_embedding_inputs}",
                    param="input",
                )  # fmt: skip
            vectors = [await until_disconnect(request, engine.embed_texts(texts))]
        else:
            vectors = await until_disconnect(request, _embed_parts(engine, body.messages or [], load_images))
        rows = [row for block in vectors for row in block.float().cpu()]
        data = [
            {"object": "embedding", "index": i, "embedding": embedding_value(row, body.encoding_format)}
            for i, row in enumerate(rows)
        ]
        return JSONResponse({
            "object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0},
        })  # fmt: skip

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        """mmlm extension: zero-shot probabilities of `labels` for one image."""
        body = await parse_body(request, ClassifyRequest)
        model = check_model(body.model, embed_model_ids())
        labels = [label.strip() for label in body.labels]
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise APIError(400, "labels: expected distinct, non-empty class names", param="labels")
        if len(labels) > config.max_labels:
            raise APIError(400, f"labels: at most {config.max_labels} labels", param="labels")
        (image,) = await load_images([(body.image, "image")])
        probabilities = await until_disconnect(request, engine.classify(image, labels))
        probabilities = [float(p) for p in probabilities]
        best = max(range(len(labels)), key=probabilities.__getitem__)
        return JSONResponse({
            "object": "classification", "model": model, "label": labels[best],
            "labels": labels, "probabilities": probabilities,
        })  # fmt: skip

    @app.post("/v1/search")
    async def search(request: Request) -> JSONResponse:
        """mmlm extension: the k indexed images nearest to a text or an image query."""
        body = await parse_body(request, SearchRequest)
        model = check_model(body.model, embed_model_ids())
        if index is None:
            raise APIError(400, "this server has no image index; start it with --index DIR", code="no_index")
        if body.text is None and body.image is None:
            raise APIError(400, "give a text, an image or both", param="text")
        if body.text is not None and not body.text.strip():
            raise APIError(400, "text: got an empty query", param="text")
        if body.k > config.max_search_k:
            raise APIError(400, f"k: at most {config.max_search_k}", param="k")
        image = (await load_images([(body.image, "image")]))[0] if body.image is not None else None
        rows = await until_disconnect(request, engine.search(body.text, image, body.k))
        return JSONResponse({"object": "list", "model": model, "data": list(rows)})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        """OpenAI's model list: the models this server answers for."""
        ids = [config.model_id] + [m for m in embed_model_ids() if m and m != config.model_id]
        data = [{"id": i, "object": "model", "created": created, "owned_by": "mmlm"} for i in ids]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness and the engine's queue depth."""
        return JSONResponse({"status": "ok", "queue_depth": int(getattr(engine, "queue_depth", 0))})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus text: the engine's series and HTTP requests by path and status code."""
        lines = [
            "# HELP mmlm_http_requests_total HTTP requests answered, by path and status code.",
            "# TYPE mmlm_http_requests_total counter",
        ]
        for (path, code), count in sorted(counts.items()):
            lines.append(f"mmlm_http_requests_total{format_labels({'path': path, 'code': code})} {count}")
        text = engine.metrics_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    if (STATIC / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def _no_image_token(text: str, field: str) -> None:
    # a placeholder typed into text would claim a media slot that no part fills
    for token, part in ((IMAGE_TOKEN, "images as image_url"), (AUDIO_TOKEN, "audio as input_audio")):
        if token in text:
            raise APIError(400, f"{field}: the text holds {token!r}; send {part} parts", param=field)


async def _collect(pieces: AsyncIterator[str]) -> list[str]:
    try:
        return [piece async for piece in pieces]
    finally:
        await pieces.aclose()


async def _embed_parts(engine, messages: list[ChatMessage], load_images) -> list[Any]:
    """Return embedding blocks of every content part, in order: texts and images each through their tower."""
    parts = [
        (f"messages.{i}.content.{j}", part)
        for i, message in enumerate(messages)
        for j, part in enumerate(message.content if isinstance(message.content, list) else [])
    ]
    if not parts:
        raise APIError(400, "messages: expected image_url (or text) content parts to embed", param="messages")
    images = await load_images(
        [(p.image_url.url, f"{f}.image_url.url") for f, p in parts if isinstance(p, ImagePart)]
    )
    blocks, image_iter = [], iter(images)
    for field, part in parts:  # one call per part keeps the order; the engine batches across requests anyway
        if isinstance(part, AudioPart):
            raise APIError(400, f"{field}: audio parts cannot be embedded by this server", param=field)
        if isinstance(part, ImagePart):
            blocks.append(await engine.embed_images([next(image_iter)]))
        else:
            blocks.append(await engine.embed_texts([part.text]))
    return blocks


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
