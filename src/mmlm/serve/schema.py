"""The wire format: request bodies as pydantic models in OpenAI's shape (vLLM's for image embeddings), and the
response pieces the app assembles (usage, stream chunks, embedding values).

Top-level objects and content parts forbid unknown fields, so a misspelt parameter ("max_token") or an unknown
part type is a 400 rather than a silent default. Parameters OpenAI defines that mmlm cannot honour are
accepted only at their neutral value.
"""

import base64
import json
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    """An image reference: a data URL (or an allow-listed http(s) URL when the server permits remote images)."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    """A text content part."""

    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    """An image content part."""

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    """Base64-encoded audio file bytes and their container format, as OpenAI's input_audio parts carry them."""

    data: str
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(_Strict):
    """An audio content part, for a model with an audio tower."""

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    """One turn: a role and string content or a list of text, image and audio parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    """OpenAI's stream_options: whether the last chunk carries usage."""

    include_usage: bool | None = None


class ChatRequest(_Strict):
    """POST /v1/chat/completions."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)  # vLLM's extension
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError("penalties are not supported; expected 0 or no value")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings: `input` texts, or vLLM's `messages` whose image (and text) parts are embedded."""

    model: str
    input: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("choosing the embedding size is not supported; leave it out")
        return value


class ClassifyRequest(_Strict):
    """POST /v1/classify (mmlm): zero-shot class probabilities of one image."""

    model: str | None = None
    image: str
    labels: list[str] = Field(min_length=1)


class SearchRequest(_Strict):
    """POST /v1/search (mmlm): the indexed images nearest to a text, an image, or both."""

    model: str | None = None
    text: str | None = None
    image: str | None = None
    k: int = Field(default=10, ge=1)


def embedding_value(row: torch.Tensor, encoding_format: str) -> list[float] | str:
    """Return one embedding [D] as floats, or as OpenAI's base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(row.float().numpy().astype("<f4").tobytes()).decode()
    return row.tolist()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Return OpenAI's usage object."""
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }  # fmt: skip


def chat_chunk(reply_id: str, created: int, model: str, delta: dict, finish: str | None, **extra) -> str:
    """Return one server-sent event holding a chat.completion.chunk with one choice."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    chunk = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [choice], **extra}  # fmt: skip
    return f"data: {json.dumps(chunk)}\n\n"
