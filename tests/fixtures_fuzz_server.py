"""The chat-template and server fuzz targets (see fixtures_fuzz.py for the decoders), and `open_target`, which
sets any target up: seeds and a call `(data, folder) -> None` that raises only InputError for bad input.

The server target posts a body to a real `mmlm serve` app over a tiny random LLaVA, run by uvicorn in a thread,
and raises ServerFault for a 5xx, a 4xx outside OpenAI's error shape, a timeout or a server that stopped.
"""

import base64
import io
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from fixtures_fuzz import DECODERS
from fixtures_vlm import LLAVA_TEMPLATE, write_tiny_llava
from mmlm.errors import InputError
from mmlm.processing.chat import ChatTemplate

# A Llama 3 style checkpoint template: role alternation enforced with raise_exception, contents trimmed.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A Qwen2-VL style template: content parts iterated, images as vision tokens.
PARTS_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = (
    ChatTemplate.llava_v1(),
    ChatTemplate.chatml(),
    ChatTemplate(LLAVA_TEMPLATE, {"eos_token": "</s>"}),
    ChatTemplate(LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    ChatTemplate(PARTS_TEMPLATE, {"eos_token": "<|im_end|>"}),
)

_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": "And the colour?"},
]


def chat_seeds() -> dict[str, bytes]:
    """Return a valid conversation as JSON, with string and part contents."""
    return {"conversation": json.dumps(_CONVERSATION).encode()}


def messages_of(data: bytes) -> object:
    """Return the messages a fuzzed input stands for: its JSON value, or (not JSON) its text as one message."""
    text = data.decode("utf-8", errors="surrogateescape")  # undecodable bytes become lone surrogates
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return [{"role": "user", "content": text}]


def render_chats(data: bytes, folder: Path) -> None:
    """Render the messages of `data` with each template in TEMPLATES, as training (answer spans) does."""
    render_messages(messages_of(data))


def render_messages(messages: object) -> None:
    """Render `messages` with each template in TEMPLATES, with and without the generation prompt."""
    for template in TEMPLATES:
        for add_generation_prompt in (False, True):
            template.render(messages, add_generation_prompt=add_generation_prompt)


# --- the server ------------------------------------------------------------------------------------------------


class ServerFault(Exception):
    """The server answered a request with a 5xx, a malformed error, no answer in time, or stopped answering."""


def _png_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def server_seeds() -> dict[str, bytes]:
    """Return valid chat completion bodies: text, an image, streamed, audio, every optional parameter."""
    image = {"type": "image_url", "image_url": {"url": _png_url(), "detail": "low"}}
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    ask = {"role": "user", "content": [image, {"type": "text", "text": "What colour?"}]}
    bodies = {
        "text": {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "image": {"model": "tiny-llava", "messages": [ask], "max_tokens": 2, "temperature": 0},
        "stream": {"model": "tiny-llava", "messages": [ask], "max_tokens": 2, "stream": True,
                   "stream_options": {"include_usage": True}},
        "audio": {"model": "tiny-llava", "messages": [{"role": "user", "content": [audio]}]},
        "options": {"model": "tiny-llava", "messages": [{"role": "system", "content": "s"}, ask],
                    "max_completion_tokens": 2, "top_p": 0.5, "top_k": 3, "stop": ["\n", "x"], "seed": 1,
                    "n": 1, "user": "u", "presence_penalty": 0, "metadata": {"a": "b"}},
    }  # fmt: skip
    return {name: json.dumps(body).encode() for name, body in bodies.items()}


def _check_answer(response: httpx.Response) -> None:
    if response.status_code >= 500:
        raise ServerFault(f"HTTP {response.status_code}: {response.text[:300]}")
    if response.status_code >= 400:
        error = response.json().get("error")
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            raise ServerFault(
                f"HTTP {response.status_code} outside OpenAI's error shape: {response.text[:300]}"
            )
        if not error["message"] or "\n" in error["message"]:
            raise ServerFault(
                f"HTTP {response.status_code}: the message is not one line: {error['message']!r}"
            )


def server_call(base_url: str, timeout: float = 30.0):
    """Return the target that posts a body to /v1/chat/completions and raises ServerFault for a fault."""
    client = httpx.Client(base_url=base_url, timeout=timeout)

    def post(data: bytes, folder: Path) -> None:
        headers = {"Content-Type": "application/json"}
        try:
            response = client.post("/v1/chat/completions", content=data, headers=headers)
            _check_answer(response)
        except httpx.TimeoutException:
            raise ServerFault(f"no answer within {timeout} s") from None
        except httpx.TransportError as error:
            raise ServerFault(f"the server stopped answering ({error})") from None
        if response.status_code >= 500 or client.get("/health").status_code != 200:
            raise ServerFault("the server is down after the request")

    return post


@contextmanager
def serving_tiny_llava(folder: Path) -> Iterator[str]:
    """Serve a tiny random LLaVA written to `folder` under small limits; yield the base URL."""
    import uvicorn

    import mmlm
    from mmlm.serve.app import create_app
    from mmlm.serve.config import ServeConfig
    from mmlm.serve.engine import Engine, EngineConfig

    write_tiny_llava(folder)
    engine = Engine(vlm=mmlm.load(folder), embedder=None, config=EngineConfig(max_queue=8, max_batch=4))
    limits = dict(max_images=2, max_image_pixels=64 * 64, max_tokens_cap=4, default_max_tokens=2,
                  max_request_bytes=200_000)  # fmt: skip
    app = create_app(engine, ServeConfig(model_id="tiny-llava", **limits))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fuzzed server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def open_target(name: str) -> Iterator[tuple[dict[str, bytes], object]]:
    """Yield (seeds, call) of the target `name`: a decoder, "chat_template" or "server"."""
    if name in DECODERS:
        make_seeds, call = DECODERS[name]
        yield make_seeds(), call
    elif name == "chat_template":
        yield chat_seeds(), render_chats
    elif name == "server":
        with tempfile.TemporaryDirectory() as folder, serving_tiny_llava(Path(folder)) as url:
            yield server_seeds(), server_call(url)
    else:
        raise InputError(f"target: got {name!r}; expected a decoder, 'chat_template' or 'server'")
