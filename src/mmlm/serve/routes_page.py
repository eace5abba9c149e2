"""The server's own routes: liveness (/health), Prometheus metrics (/metrics) and the static web page at /."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from mmlm.serve.metrics import format_labels

STATIC = Path(__file__).parent / "static"


def add_page_routes(app: FastAPI, engine, counts: dict[tuple[str, str], int]) -> None:
    """Add GET /health and /metrics, then the web page at / (last: a mount at / would shadow later routes)."""

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
