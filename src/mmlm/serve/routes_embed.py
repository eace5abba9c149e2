"""The contrastive model's endpoints: OpenAI embeddings (texts, or vLLM-style image and text parts), and mmlm's
zero-shot classify and image-index search."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mmlm.serve.config import ServeConfig
from mmlm.serve.errors import APIError
from mmlm.serve.images import load_request_images
from mmlm.serve.requests import parse_body, until_disconnect
from mmlm.serve.schema import (
    AudioPart,
    ChatMessage,
    ClassifyRequest,
    EmbeddingRequest,
    ImagePart,
    SearchRequest,
    embedding_value,
)
from mmlm.serve.served_models import check_model, embed_model_ids


def add_embedding_routes(app: FastAPI, engine, config: ServeConfig) -> None:
    """Add POST /v1/embeddings, /v1/classify and /v1/search to `app`."""
    index = getattr(engine, "index", None)
    has_embedder = bool(getattr(engine, "embedder", None))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        """OpenAI embeddings of texts (`input`) or of the image and text parts of vLLM-style `messages`."""
        body = await parse_body(request, EmbeddingRequest)
        model = check_model(body.model, embed_model_ids(config, has_embedder))
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
            vectors = await until_disconnect(request, _embed_parts(engine, body.messages or [], config))
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
        model = check_model(body.model, embed_model_ids(config, has_embedder))
        labels = [label.strip() for label in body.labels]
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise APIError(400, "labels: expected distinct, non-empty class names", param="labels")
        if len(labels) > config.max_labels:
            raise APIError(400, f"labels: at most {config.max_labels} labels", param="labels")
        (image,) = await load_request_images([(body.image, "image")], config)
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
        model = check_model(body.model, embed_model_ids(config, has_embedder))
        if index is None:
            raise APIError(400, "this server has no image index; start it with --index DIR", code="no_index")
        if body.text is None and body.image is None:
            raise APIError(400, "give a text, an image or both", param="text")
        if body.text is not None and not body.text.strip():
            raise APIError(400, "text: got an empty query", param="text")
        if body.k > config.max_search_k:
            raise APIError(400, f"k: at most {config.max_search_k}", param="k")
        image = (
            (await load_request_images([(body.image, "image")], config))[0]
            if body.image is not None
            else None
        )
        rows = await until_disconnect(request, engine.search(body.text, image, body.k))
        return JSONResponse({"object": "list", "model": model, "data": list(rows)})


async def _embed_parts(engine, messages: list[ChatMessage], config: ServeConfig) -> list[Any]:
    """Return embedding blocks of every content part, in order: texts and images each through their tower."""
    parts = [
        (f"messages.{i}.content.{j}", part)
        for i, message in enumerate(messages)
        for j, part in enumerate(message.content if isinstance(message.content, list) else [])
    ]
    if not parts:
        raise APIError(400, "messages: expected image_url (or text) content parts to embed", param="messages")
    images = await load_request_images(
        [(p.image_url.url, f"{f}.image_url.url") for f, p in parts if isinstance(p, ImagePart)], config
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
