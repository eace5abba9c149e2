"""Generation backends for the VLM harness: one prompt text and its images (or audio clip, or video) in, one
answer text out.

A backend takes the task's rendered prompt (plain text, no image placeholder) and adds the image in its own
way: mmlm and transformers models through their chat template with the image first, an OpenAI-compatible
server through `image_url` content parts. An empty image list asks for a text-only answer. `name` identifies
the model in the generation cache, so two backends that could answer differently must not share a name: it
holds the runner, the folder (or server and served model) and the dtype. The device is left out on purpose,
so a run started on one machine can resume on another.

Audio clips and videos reach a backend wrapped as `Audio` and `Video` in a prompt's media list. Only the mmlm
backend takes them (through `<audio>` and `<video>`); the others answer an InputError.
"""

import base64
import http.client
import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from mmlm.errors import InputError


@dataclass(frozen=True)
class Audio:
    """An audio clip for a model with an audio tower: a file path or 16 kHz samples."""

    source: Any


@dataclass(frozen=True)
class Video:
    """A video for the model to see as sampled frames: a file path."""

    source: Any


ImageList = Sequence[Any]  # PIL images, or one Audio or Video
PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}


class Backend(Protocol):
    """A model that answers prompts, each with zero or more images."""

    name: str

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageList],
        max_new_tokens: int,
        temperature: float = 0.0,
    ) -> list[str]:
        """Return one answer per prompt; `images[i]` are prompt i's images (empty: text only)."""
        ...


def medium_of(items: Sequence[Any]) -> str | None:
    """Return "image", "audio" or "video" for a prompt's media list, or None when it is empty."""
    if not items:
        return None
    return "audio" if isinstance(items[0], Audio) else "video" if isinstance(items[0], Video) else "image"


def image_messages(prompt: str, with_image: bool | str | None) -> list[dict[str, Any]]:
    """Return one user message: an image part then the prompt's text part, "<audio>\\n" (or "<video>\\n") + prompt,
    or the prompt alone.

    The image goes in as a content part, as transformers' backend sends it: some checkpoints' templates (Idefics3,
    SmolVLM) render only parts, and mmlm's built-in templates render an image part as "<image>\\n", the text
    its instruction data was trained on.
    """
    kind = "image" if with_image is True else with_image
    if kind == "image":
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return [{"role": "user", "content": f"{PLACEHOLDERS[kind]}\n{prompt}" if kind else prompt}]


def images_only(media: Sequence[ImageList], backend: str) -> None:
    """Raise InputError if any prompt carries audio or video, which only the mmlm backend takes."""
    if any(medium_of(items) in ("audio", "video") for items in media):
        raise InputError(f"{backend}: audio and video samples need an mmlm model (mmlm eval vlm --model DIR)")


class MMLMBackend:
    """An mmlm GenerativeModel (`mmlm.load` of a LLaVA or mmlm VLM folder), batched and KV-cached."""

    def __init__(self, model: Any, name: str, num_frames: int = 8) -> None:
        from mmlm.inference.vlm import GenerativeModel

        if not isinstance(model, GenerativeModel):
            raise InputError(f"{name}: a {type(model).__name__}, not a generative vision-language model")
        if num_frames < 1:
            raise InputError(f"--frames must be at least 1, got {num_frames}")
        self.model = model
        self.num_frames = num_frames  # sampled from each video; other than 8, it is part of the cache name
        self.name = name if num_frames == 8 else f"{name}:frames={num_frames}"
        model.model.eval()

    @classmethod
    def load(
        cls,
        folder: str,
        device: str = "cpu",
        dtype: str = "float32",
        num_frames: int = 8,
        revision: str | None = None,
    ) -> "MMLMBackend":
        """Return the backend of the mmlm or transformers LLaVA folder `folder` (or hub id, at `revision`)."""
        import mmlm
        from mmlm.checkpoints.hub import resolve_folder

        # a hub id's snapshot folder names its commit, so the generation cache keeps revisions apart
        folder = resolve_folder(folder, revision)
        model = mmlm.load(folder, device=device, dtype=dtype)
        return cls(model, f"mmlm:{Path(folder).resolve()}:{dtype}", num_frames)

    def render(self, prompt: str, with_image: bool | str | None) -> str:
        """Return the model's input text for one prompt (chat template applied, media tokens unexpanded)."""
        return self.model.processor.render(image_messages(prompt, with_image), add_generation_prompt=True)[0]

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageList],
        max_new_tokens: int,
        temperature: float = 0.0,
    ) -> list[str]:
        """Return the model's answers; temperature 0 is greedy."""
        kinds = [medium_of(items) for items in images]
        messages = [image_messages(p, kind) for p, kind in zip(prompts, kinds, strict=True)]
        pick = {kind: [[m.source if kind != "image" else m for m in items] if k == kind else []
                       for items, k in zip(images, kinds, strict=True)] for kind in PLACEHOLDERS}  # fmt: skip
        texts = self.model.generate(
            messages, pick["image"] if "image" in kinds else None, max_new_tokens=max_new_tokens,
            temperature=temperature, audio=pick["audio"] if "audio" in kinds else None,
            videos=pick["video"] if "video" in kinds else None, num_frames=self.num_frames,
        )  # fmt: skip
        return [t.strip() for t in texts]


class TransformersBackend:
    """Any transformers image-text-to-text folder, through AutoProcessor and AutoModelForImageTextToText."""

    def __init__(self, folder: str, device: str = "cpu", dtype: str = "float32") -> None:
        try:
            import torch
            import transformers
            from packaging import version
        except ImportError as error:
            raise InputError(
                "--transformers needs the transformers package: pip install transformers"
            ) from error
        auto_model = getattr(transformers, "AutoModelForImageTextToText", None)
        if auto_model is None:
            raise InputError(
                f"transformers {transformers.__version__} lacks AutoModelForImageTextToText; "
                "expected transformers >= 4.46"
            )
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise InputError(f"{folder}: not a model folder (config.json is missing)")
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise InputError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(path)
            # transformers 4.56 renamed torch_dtype to dtype
            dtype_arg = (
                "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
            )
            model = auto_model.from_pretrained(path, **{dtype_arg: getattr(torch, dtype)})
            self.model = model.to(device).eval()
        except (OSError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"{folder}: transformers cannot load it as image-text-to-text: {first_line}"
            ) from error
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise InputError(f"{folder}: the processor has no tokenizer")
        tokenizer.padding_side = "left"  # decoder-only batches generate from a shared right edge
        self.tokenizer = tokenizer
        self.chat_template = getattr(self.processor, "chat_template", None) or tokenizer.chat_template
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.name = f"transformers:{path.resolve()}:{dtype}"
        self.torch = torch

    def render(self, prompt: str, with_image: bool) -> str:
        """Return the model's input text for one prompt: its chat template with the image first, if any."""
        if self.chat_template is None:
            return f"{self.image_token}\n{prompt}" if with_image else prompt
        parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        conversation = [{"role": "user", "content": parts}]
        return self.processor.apply_chat_template(
            conversation, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )

    def _generate_group(self, texts: list[str], images: list[Image.Image], settings: dict) -> list[str]:
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        batch = batch.to(self.model.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, **settings)
        new = out[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageList],
        max_new_tokens: int,
        temperature: float = 0.0,
    ) -> list[str]:
        """Return the model's answers; prompts with and without images run as separate batches."""
        images_only(images, self.name)
        settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            settings["temperature"] = temperature
        pad = self.tokenizer.pad_token_id
        settings["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        answers: list[str | None] = [None] * len(prompts)
        for with_image in (True, False):
            rows = [i for i, ims in enumerate(images) if bool(ims) == with_image]
            if not rows:
                continue
            texts = [self.render(prompts[i], with_image) for i in rows]
            flat = [im for i in rows for im in images[i]]
            for i, text in zip(rows, self._generate_group(texts, flat, settings), strict=True):
                answers[i] = text
        return [a or "" for a in answers]


def png_data_url(image: Image.Image) -> str:
    """Return `image` as a base64 PNG data URL, as OpenAI-style chat APIs take images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


class OpenAIBackend:
    """An OpenAI-compatible server (vLLM, llama.cpp, SGLang, OpenAI): POST {url}/v1/chat/completions."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 8,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--endpoint: expected an http:// or https:// URL, got {url!r}")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.model = model or self._first_served_model()
        self.name = f"openai:{self.base}:{self.model}"

    def _request(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = f"{self.base}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url, data=data, headers=headers, method="GET" if body is None else "POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = _one_line(error.read().decode("utf-8", "replace"))
            raise InputError(f"{url}: HTTP {error.code} {error.reason}: {detail}") from error
        except urllib.error.URLError as error:
            raise InputError(f"{url}: cannot reach the server ({error.reason})") from error
        except TimeoutError as error:
            raise InputError(f"{url}: no answer within {self.timeout:g} s") from error
        except (OSError, http.client.HTTPException) as error:  # the connection dropped mid-answer
            raise InputError(f"{url}: the connection failed ({type(error).__name__}: {error})") from error
        try:
            return json.loads(payload)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{url}: expected a JSON response, got {_one_line(payload.decode('utf-8', 'replace'), 80)!r}"
            ) from error

    def _first_served_model(self) -> str:
        listing = self._request("/v1/models", None)
        models = listing.get("data") if isinstance(listing, dict) else None
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise InputError(f"{self.base}/v1/models lists no model; give --served-model")
        return str(models[0]["id"])

    def request_body(self, prompt: str, images: ImageList, max_new_tokens: int, temperature: float) -> dict:
        """Return the chat-completions request for one prompt: a text part, then one image_url part per image."""
        parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        parts += [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]
        return {"model": self.model, "messages": [{"role": "user", "content": parts}],
                "temperature": temperature, "max_tokens": max_new_tokens}  # fmt: skip

    def render(self, prompt: str, with_image: bool) -> str:
        """Return the request body of one prompt as JSON, the image data URL abbreviated."""
        parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        if with_image:
            parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}})
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": parts}]})

    def _answer(self, body: dict[str, Any]) -> str:
        reply = self._request("/v1/chat/completions", body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise InputError(
                f"{self.base}/v1/chat/completions: expected choices[0].message.content, got {_one_line(json.dumps(reply), 120)}"
            ) from error
        return (content or "").strip()

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageList],
        max_new_tokens: int,
        temperature: float = 0.0,
    ) -> list[str]:
        """Return the server's answers, requested `concurrency` at a time."""
        images_only(images, self.name)
        bodies = [
            self.request_body(p, ims, max_new_tokens, temperature)
            for p, ims in zip(prompts, images, strict=True)
        ]
        with ThreadPoolExecutor(min(self.concurrency, len(bodies)) or 1) as pool:
            return list(pool.map(self._answer, bodies))
