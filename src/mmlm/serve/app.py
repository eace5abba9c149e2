"""The HTTP app of `mmlm serve`: OpenAI-compatible chat completions and embeddings, plus mmlm's classify and search.

Requests are checked at this boundary (schema, size, images, limits, key) and handed to the Engine, which
batches and runs the models. Every refusal is a 4xx in OpenAI's error shape (`mmlm.serve.errors`). A client
that goes away cancels its engine work: each engine call races the client's disconnect. The routes live by
group: routes_openai.py (chat completions, models), routes_embed.py (embeddings, classify, search),
thumbnails.py (search results' images) and routes_page.py (health, metrics, the web page).
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from mmlm.serve.config import ServeConfig
from mmlm.serve.drain import Drain
from mmlm.serve.errors import add_error_handlers
from mmlm.serve.requests import ClientGone, RequestGate
from mmlm.serve.routes_embed import add_embedding_routes
from mmlm.serve.routes_openai import add_openai_routes
from mmlm.serve.routes_page import add_page_routes
from mmlm.serve.thumbnails import add_thumbnail_route


def create_app(engine, config: ServeConfig) -> FastAPI:
    """Return the FastAPI app serving `engine` under the limits of `config`; it starts and stops the engine."""
    config.check()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="mmlm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.drain = engine, config, Drain()  # drain: see DrainingServer
    counts: dict[tuple[str, str], int] = {}  # (path, status code) -> requests, filled by RequestGate
    add_error_handlers(app)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_middleware(RequestGate, config=config, counts=counts, drain=app.state.drain)
    add_openai_routes(app, engine, config)
    add_embedding_routes(app, engine, config)
    add_thumbnail_route(app, engine, config)
    add_page_routes(app, engine, counts)
    return app


async def _on_client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it
