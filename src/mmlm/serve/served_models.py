"""The model ids a `mmlm serve` endpoint answers for, and the check of a request's `model` field against them."""

from mmlm.serve.config import ServeConfig
from mmlm.serve.errors import APIError


def check_model(name: str | None, served: list[str | None]) -> str:
    """Return the model id a request names (or the endpoint's first when it names none); 400/404 otherwise."""
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


def embed_model_ids(config: ServeConfig, has_embedder: bool) -> list[str | None]:
    """Return the ids that embeddings, classify and search answer for: --embed-model's, or --model's if contrastive."""
    return [config.embed_model_id] if config.embed_model_id else ([config.model_id] if has_embedder else [])
