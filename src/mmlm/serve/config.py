"""What the HTTP server allows: limits, the API key, remote images and the guard, with safe defaults."""

from dataclasses import dataclass

from mmlm.errors import InputError

GUARD_MODES = ("off", "note", "strict")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of `create_app`: the names the models are served under, access, and the request limits."""

    model_id: str = (
        "mmlm"  # the `model` name clients send for chat (and embeddings when --model is contrastive)
    )
    embed_model_id: str | None = None  # the name of --embed-model, when one is loaded
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"
    guard: str = (
        "off"  # off | note (add GUARD_SYSTEM_NOTE when an image reads as instructions) | strict (400)
    )
    allow_remote_images: bool = False
    allowed_domains: tuple[str, ...] = ()  # a domain also allows its sub-domains
    remote_timeout_s: float = 5.0
    remote_max_bytes: int = 10 * 2**20
    remote_max_redirects: int = 3
    max_request_bytes: int = 20 * 2**20  # a base64 image is 4/3 of its file
    max_image_pixels: int = 4096 * 4096  # refused from the header, before any pixel is decoded
    max_images: int = 8  # per request
    max_tokens_cap: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives no max_tokens (at most max_tokens_cap)
    max_embedding_inputs: int = 256
    max_labels: int = 256
    max_search_k: int = 100
    drain_seconds: float = 30.0  # on SIGTERM, in-flight requests get this long to finish (new ones: 503)

    def check(self) -> None:
        """Raise InputError for settings the server cannot run with."""
        if self.guard not in GUARD_MODES:
            raise InputError(f"--guard: expected one of {', '.join(GUARD_MODES)}, got {self.guard!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("--api-key: got an empty key")
        if self.allow_remote_images and not self.allowed_domains:
            raise InputError("--allow-remote-images needs at least one --allow-domain")
        if not self.drain_seconds >= 0:
            raise InputError(f"--drain-seconds: expected a number >= 0, got {self.drain_seconds}")
        for name in (
            "max_request_bytes", "max_image_pixels", "max_images", "max_tokens_cap", "default_max_tokens",
            "max_embedding_inputs", "max_labels", "max_search_k", "remote_max_bytes",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')}: expected a positive number, got {getattr(self, name)}"
                )
