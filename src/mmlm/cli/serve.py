"""`mmlm serve`: load the models, build the engine and the app, and run them under uvicorn."""

import argparse
import ipaddress
import sys
from pathlib import Path

from mmlm.cli.model_args import add_device_args, add_revision_arg
from mmlm.errors import InputError
from mmlm.serve.config import GUARD_MODES, ServeConfig


def serve_config(args: argparse.Namespace, model_id: str, embed_model_id: str | None) -> ServeConfig:
    """Return the ServeConfig the command-line arguments ask for."""
    config = ServeConfig(
        model_id=model_id,
        embed_model_id=embed_model_id,
        api_key=args.api_key,
        guard=args.guard,
        allow_remote_images=args.allow_remote_images,
        allowed_domains=tuple(d.lower().strip(".") for d in args.allow_domain or ()),
        max_request_bytes=args.max_request_bytes,
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tokens_cap=args.max_tokens_cap,
        drain_seconds=args.drain_seconds,
    )
    config.check()
    return config


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the models over HTTP until interrupted."""
    import mmlm
    from mmlm.inference.contrastive import ContrastiveModel
    from mmlm.inference.vlm import GenerativeModel
    from mmlm.serve.engine import Engine, EngineConfig

    if args.max_queue < 1:
        raise InputError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 < args.port < 65536:
        raise InputError(f"--port: expected 1..65535, got {args.port}")
    if args.guard != "off":
        from mmlm.processing.ocr import tesseract_path

        if tesseract_path() is None:
            raise InputError("--guard needs the tesseract binary (apt-get install tesseract-ocr)")
    model = mmlm.load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    vlm = model if isinstance(model, GenerativeModel) else None
    embedder = model if isinstance(model, ContrastiveModel) else None
    if vlm is None and embedder is None:
        raise InputError(f"--model {args.model}: expected a vision-language or contrastive model")
    embed_model_id = None
    if args.embed_model:
        if embedder is not None:
            raise InputError("--embed-model: --model is already a contrastive model; give one of them")
        embedder = mmlm.load(
            args.embed_model, device=args.device, dtype=args.dtype, revision=args.embed_model_revision
        )
        if not isinstance(embedder, ContrastiveModel):
            raise InputError(f"--embed-model {args.embed_model}: expected a contrastive (CLIP/SigLIP) model")
        embed_model_id = args.embed_model_name or served_name(args.embed_model)
    index = None
    if args.index:
        from mmlm.index import ImageIndex

        if embedder is None:
            raise InputError("--index needs a contrastive model (--model or --embed-model) to embed queries")
        index = ImageIndex.open(args.index)
        index.check_model(embedder)
    config = serve_config(args, args.model_name or served_name(args.model), embed_model_id)
    engine_config = EngineConfig(
        max_queue=args.max_queue, max_batch=args.batch_size, batching=not args.no_batching
    )
    run(Engine(vlm=vlm, embedder=embedder, index=index, config=engine_config), config, args.host, args.port)


def served_name(model: str) -> str:
    """Return the id clients send for `model`: a folder's name, or a hub id as given ("org/name")."""
    return Path(model).resolve().name if Path(model).is_dir() else model


def run(engine, config: ServeConfig, host: str, port: int) -> None:
    """Run the app under uvicorn on host:port (blocking)."""
    import uvicorn
    from PIL import Image

    from mmlm.serve.app import create_app
    from mmlm.serve.drain import DrainingServer

    # past this, PIL itself refuses (DecompressionBombError) any image opened in this process
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    if config.api_key is None and not _loopback(host):
        print(f"mmlm serve: warning: listening on {host} without --api-key; anyone who can reach it may use it",
              file=sys.stderr)  # fmt: skip
    app = create_app(engine, config)
    # past the drain, uvicorn's own wait for open connections is short: the deadline is the drain's
    server_config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=5,
                                   timeout_graceful_shutdown=1)  # fmt: skip
    DrainingServer(server_config, app.state.drain, config.drain_seconds).run()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the command line."""
    defaults = ServeConfig()
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: chat, embeddings, classify, search")
    p.add_argument(
        "--model", required=True, help="a VLM or a contrastive (CLIP/SigLIP) model folder or hub id"
    )
    add_revision_arg(p)
    p.add_argument(
        "--model-name", help="the model id clients send (default: the folder's name, or the hub id)"
    )
    p.add_argument(
        "--embed-model", help="a contrastive model folder or hub id for embeddings, classify and search"
    )
    add_revision_arg(p, "--embed-model-revision", "--embed-model")
    p.add_argument(
        "--embed-model-name", help="the id of --embed-model (default: the folder's name, or the hub id)"
    )
    p.add_argument("--index", help="an image index folder (mmlm index build) for /v1/search")
    add_device_args(p)
    p.add_argument("--batch-size", type=int, default=8, help="requests per model batch")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--guard", choices=GUARD_MODES, default="off",
                   help="OCR images for prompt injection: note adds a system note, strict refuses (needs tesseract)")  # fmt: skip
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs, only from --allow-domain hosts with public addresses")  # fmt: skip
    p.add_argument(
        "--allow-domain", action="append", help="a domain remote images may come from (repeatable)"
    )
    p.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes)
    p.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    p.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request")
    p.add_argument(
        "--max-tokens-cap", type=int, default=defaults.max_tokens_cap, help="the largest max_tokens"
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; beyond it 429")
    p.add_argument("--no-batching", action="store_true", help="run one request at a time")
    p.add_argument("--drain-seconds", type=float, default=defaults.drain_seconds,
                   help="on SIGTERM, how long in-flight requests may finish (new ones get 503) before exit")  # fmt: skip
    p.set_defaults(func=cmd_serve)
