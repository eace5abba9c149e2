"""An OpenAI chat completions request read into mmlm's terms: chat messages with image and audio parts in
order, the image URLs and audio files they carry, the generation settings, and the prompt-injection guard."""

import asyncio
import base64
from collections.abc import Callable
from typing import Any

from PIL import Image

from mmlm.inference.generation import GenerationSettings
from mmlm.processing.chat import AUDIO_TOKEN, IMAGE_TOKEN
from mmlm.serve.config import ServeConfig
from mmlm.serve.errors import APIError
from mmlm.serve.guard import GUARD_SYSTEM_NOTE  # loaded with `inspect`, only when the guard is on
from mmlm.serve.schema import AudioPart, ChatMessage, ChatRequest, ImagePart


def chat_messages(
    messages: list[ChatMessage], vlm: Any
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[bytes]]:
    """Map OpenAI messages to mmlm chat messages (image and audio parts in order), the image URLs they name
    and the audio files they carry."""
    out, urls, audio = [], [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content if message.content is not None else ""
        if isinstance(content, str):
            _check_text(content, f"messages.{i}.content")
            out.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            field = f"messages.{i}.content.{j}"
            if isinstance(part, ImagePart):
                if role != "user":
                    raise APIError(400, f"{field}: images are accepted in user messages only", param=field)
                urls.append((part.image_url.url, f"{field}.image_url.url"))
                parts.append({"type": "image"})
            elif isinstance(part, AudioPart):
                audio.append(audio_bytes(part, field, role, vlm))
                parts.append({"type": "audio"})
            else:
                _check_text(part.text, f"{field}.text")
                parts.append({"type": "text", "text": part.text})
        out.append({"role": role, "content": parts})
    return out, urls, audio


def audio_bytes(part: AudioPart, field: str, role: str, vlm: Any) -> bytes:
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


def _check_text(text: str, field: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to lone surrogates no tokenizer takes
            raise APIError(
                400, f"{field}: holds a lone UTF-16 surrogate; expected valid Unicode text", param=field
            ) from None
    # a placeholder typed into text would claim a media slot that no part fills
    for token, part in ((IMAGE_TOKEN, "images as image_url"), (AUDIO_TOKEN, "audio as input_audio")):
        if token in text:
            raise APIError(400, f"{field}: the text holds {token!r}; send {part} parts", param=field)


def generation_settings(body: ChatRequest, config: ServeConfig) -> GenerationSettings:
    """Return the decoding settings a chat request asks for, within the server's token cap."""
    if body.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported, got {body.n}", param="n", code="unsupported_value")
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


async def run_guard(
    messages: list[dict[str, Any]], images: list[Image.Image], inspect: Callable | None, mode: str
) -> dict[str, Any] | None:
    """Return the guard's report on the images (None when off); refuse (strict) or add a system note (note)."""
    if inspect is None or not images:
        return None

    verdicts = [await asyncio.to_thread(inspect, image) for image in images]
    flagged = [v for v in verdicts if v.flagged]
    report = {
        "flagged": bool(flagged),
        "score": max(v.score for v in verdicts),
        "reasons": sorted({r for v in verdicts for r in v.reasons}),
    }
    if flagged and mode == "strict":
        raise APIError(
            400, "an image reads as instructions to the assistant (possible prompt injection); refused: "
            + "; ".join(report["reasons"]), param="messages", code="prompt_injection_suspected",
        )  # fmt: skip
    if flagged:
        if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + GUARD_SYSTEM_NOTE}
        else:
            messages.insert(0, {"role": "system", "content": GUARD_SYSTEM_NOTE})
    return report
