"""Chat templates: a conversation -> the prompt string a checkpoint was trained on, plus where its answers are.

A checkpoint's own Jinja `chat_template` (processor_config.json, chat_template.jinja, chat_template.json or
tokenizer_config.json) is rendered in jinja2's `ImmutableSandboxedEnvironment` with the globals transformers
gives it (`raise_exception`, `strftime_now`, the special tokens, `add_generation_prompt`, a JSON `tojson`), so the
text equals `apply_chat_template(..., tokenize=False)` and no code from a checkpoint runs outside the sandbox.
Without one, `ChatTemplate.llava_v1()` and `ChatTemplate.chatml()` are built-in templates of the same kind.

For training, `render` also returns the character span of each assistant answer (with its end-of-turn
token), found by rendering once more with the answer replaced by a sentinel: the text before and after the
sentinel is the text before and after the answer, whatever the template does around it.
"""

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mmlm.errors import InputError
from mmlm.json_files import read_json_object

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "audio")
# End-of-turn markers of common templates (ChatML, Llama 3, Phi-3, Gemma); the eos token is added per template.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Private-use characters: no tokenizer normalisation or template filter (trim, upper) changes them.
_SENTINEL = "\ue000\ue001\ue002"

Message = dict[str, Any]

# Each content is a string used as written, or a list of parts; an image (audio) part becomes the image (audio)
# token and a newline, but for an image part marked `joined` (a video's frame slots but the last; video_prompt.py):
# a video's slots sit together with one newline after them, as `<video>\n` in a string prompt expands.
_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}{{ image_token }}{%- if not part.joined -%}{{ '\\n' }}{%- endif -%}"
    "{%- elif part.type == 'audio' -%}{{ audio_token + '\\n' }}"
    "{%- else -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
# the macro as mmlm saved it before video slots sat together: a template that has it is read with the current one
_CONTENT_MACRO_V0 = _CONTENT_MACRO.replace(
    "{{ image_token }}{%- if not part.joined -%}{{ '\\n' }}{%- endif -%}", "{{ image_token + '\\n' }}"
)
# LLaVA v1 ("vicuna_v1"): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"
LLAVA_V1_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ render_content(message.content) + ' ' }}"
    "{%- elif message.role == 'user' -%}{{ 'USER: ' + render_content(message.content) + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + render_content(message.content) + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
# ChatML (Qwen, LLaVA-OneVision): "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
CHATML_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class _Generation(jinja2.ext.Extension):
    # transformers' `{% generation %}...{% endgeneration %}` marks assistant text in some templates;
    # it renders its body unchanged (answer spans come from the sentinel render instead).
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: Jinja's own tojson escapes HTML characters, which chat templates do not want
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    # The options and globals transformers' apply_chat_template renders with, so output is identical.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _plain(value: Any) -> Any:
    # The sandbox only ever sees JSON data: images and other objects in content parts become "<TypeName>".
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def check_messages(messages: Any) -> list[Message]:
    """Return `messages` as a list of role/content dicts, or raise InputError naming the bad field."""
    if not isinstance(messages, list | tuple) or not messages:
        raise InputError("messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role: expected one of {ROLES}, got {_role_of(message)!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list | tuple):
            raise InputError(f"messages[{i}].content: expected a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") not in PART_TYPES:
                raise InputError(f"messages[{i}].content[{j}].type: expected one of {PART_TYPES}")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise InputError(f"messages[{i}].content[{j}].text: expected a string")
    return list(messages)


def _role_of(message: Any) -> Any:
    return message.get("role") if isinstance(message, Mapping) else type(message).__name__


def _with_sentinel(message: Message) -> tuple[Message, int]:
    # The message with every piece of its text replaced by the sentinel, and how many pieces there were.
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": _SENTINEL}, 1
    parts = [{**p, "text": _SENTINEL} if p["type"] == "text" else p for p in content]
    return {**message, "content": parts}, sum(p["type"] == "text" for p in content)


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation and the [start, end) character spans of its assistant answers."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]


@dataclass
class ChatTemplate:
    """A Jinja chat template with the special tokens it may use; `render` turns messages into a prompt."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as strings
    image_token: str = IMAGE_TOKEN
    end_of_turn: tuple[str, ...] = END_OF_TURN  # markers after an answer that belong to it (plus eos_token)

    def __post_init__(self) -> None:
        if _CONTENT_MACRO_V0 in self.source:
            object.__setattr__(self, "source", self.source.replace(_CONTENT_MACRO_V0, _CONTENT_MACRO))
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise InputError(f"chat_template: not a valid Jinja template ({error})") from error
        eos = self.special_tokens.get("eos_token")
        self._markers = tuple(dict.fromkeys([*self.end_of_turn, *([eos] if eos else [])]))

    @classmethod
    def llava_v1(cls, eos_token: str = "</s>", image_token: str = IMAGE_TOKEN) -> "ChatTemplate":
        """Return the built-in LLaVA v1 template: "USER: <image>\\nQ ASSISTANT: A</s>"."""
        return cls(LLAVA_V1_TEMPLATE, {"eos_token": eos_token}, image_token)

    @classmethod
    def chatml(cls, image_token: str = IMAGE_TOKEN) -> "ChatTemplate":
        """Return the built-in ChatML template: "<|im_start|>role\\n...<|im_end|>\\n"."""
        return cls(CHATML_TEMPLATE, {"eos_token": "<|im_end|>"}, image_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_token: str = IMAGE_TOKEN) -> "ChatTemplate | None":
        """Return the template a checkpoint folder ships (with its special tokens), or None if it has none."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        # transformers' ProcessorMixin.from_pretrained: a "chat_template" key in processor_config.json (older
        # processor saves) wins over the template files
        source = _read_json(folder / "processor_config.json").get("chat_template")
        if source is None and (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif source is None and (folder / "chat_template.json").is_file():
            source = _read_json(folder / "chat_template.json").get("chat_template")
        elif source is None:
            source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default")
        elif isinstance(source, Mapping) and "default" in source:  # named templates saved as {name: template}
            source = source["default"]
        if source is None:
            return None
        if not isinstance(source, str):
            raise InputError(f"{folder}: chat_template: expected a Jinja string, got {type(source).__name__}")
        return cls(source, special_tokens_of(folder), image_token)

    def render_text(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Return the conversation rendered as one prompt string."""
        context = {
            "tools": None,
            "documents": None,
            **self.special_tokens,
            "image_token": self.image_token,
            "audio_token": AUDIO_TOKEN,
            **kwargs,
            "messages": _plain(list(messages)),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**_plain(context))
        except jinja2.TemplateError as error:
            raise InputError(f"chat_template: rendering failed: {error}") from error

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any
    ) -> RenderedChat:
        """Return the rendered conversation and the character span of every assistant answer in it."""
        messages = check_messages(messages)
        text = self.render_text(messages, add_generation_prompt, **kwargs)
        spans = self._verbatim_spans(messages, text, add_generation_prompt, **kwargs)
        if spans is None:
            spans = self._probe_spans(messages, text, add_generation_prompt, **kwargs)
        gap = self.answer_gap
        if gap:  # the model writes the gap first at inference, so an answer's labels start with it
            spans = tuple((a - len(gap) if text[max(0, a - len(gap)) : a] == gap else a, b) for a, b in spans)
        return RenderedChat(text, spans)

    @functools.cached_property
    def answer_gap(self) -> str:
        """Return the text the template puts between its generation prompt and an answer ("" for most; " " for
        LLaVA v1's "ASSISTANT: answer" after the generation prompt "ASSISTANT:"). Generation starts before it,
        so training labels it as LLaVA's masking does; "" where a probe conversation cannot show it."""
        user = {"role": "user", "content": "x"}
        try:
            prompt = self.render_text([user], add_generation_prompt=True)
            answered = self.render_text([user, {"role": "assistant", "content": _SENTINEL}])
        except Exception:  # noqa: BLE001 - a template that needs more than one user turn shows no gap
            return ""
        if not answered.startswith(prompt) or _SENTINEL not in answered[len(prompt) :]:
            return ""
        return answered[len(prompt) : answered.index(_SENTINEL)]

    def _probe_spans(
        self, messages: Sequence[Message], text: str, add_generation_prompt: bool, **kwargs: Any
    ) -> tuple[tuple[int, int], ...]:
        """Return every answer's span, each located by a render with that answer replaced by the sentinel."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            marked, pieces = _with_sentinel(message)
            if pieces == 0:
                continue
            probe = self.render_text(
                [*messages[:i], marked, *messages[i + 1 :]], add_generation_prompt, **kwargs
            )
            if probe.count(_SENTINEL) != pieces:
                raise InputError(
                    f"chat_template: renders messages[{i}]'s text {probe.count(_SENTINEL)} times"
                )
            before, after = probe[: probe.index(_SENTINEL)], probe[probe.rindex(_SENTINEL) + len(_SENTINEL) :]
            if not (
                text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)
            ):
                raise InputError(f"chat_template: cannot locate messages[{i}] in the rendered text")
            spans.append((len(before), len(text) - len(after) + self._marker_length(after)))
        return tuple(spans)

    def _verbatim_spans(
        self, messages: Sequence[Message], text: str, add_generation_prompt: bool, **kwargs: Any
    ) -> tuple[tuple[int, int], ...] | None:
        """Return every answer's span from one probe render, or None where this shortcut cannot prove them.

        The probe writes sentinel k in place of the k-th answer; when the rendered text is the probe with each
        sentinel replaced by its answer verbatim, the spans follow from the probe's pieces. A template that edits
        answers (strip, case) fails that equality and `render` falls back to one probe per answer, which
        locates each edited answer on its own. One probe instead of one per answer: the trainer renders every
        multi-turn sample on every draw.
        """
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(answers) < 2 or any(not isinstance(messages[i]["content"], str) for i in answers):
            return None
        sentinels = [f"{_SENTINEL}{k}{_SENTINEL}" for k in range(len(answers))]
        probe_messages = list(messages)
        for i, sentinel in zip(answers, sentinels, strict=True):
            probe_messages[i] = {**messages[i], "content": sentinel}
        probe = self.render_text(probe_messages, add_generation_prompt, **kwargs)
        spans, pieces, rest = [], [], probe
        for i, sentinel in zip(answers, sentinels, strict=True):
            if rest.count(sentinel) != 1:
                return None
            literal, rest = rest.split(sentinel)
            start = sum(map(len, pieces)) + len(literal)
            pieces += [literal, messages[i]["content"]]
            spans.append((start, start + len(messages[i]["content"])))
        if _SENTINEL in rest or "".join(pieces) + rest != text:
            return None
        return tuple((start, end + self._marker_length(text[end:])) for start, end in spans)

    def _marker_length(self, after: str) -> int:
        # An end-of-turn marker right after the answer (optionally after spaces) is part of what it predicts.
        stripped = after.lstrip(" ")
        for marker in self._markers:
            if stripped.startswith(marker):
                return len(after) - len(stripped) + len(marker)
        return 0


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def special_tokens_of(folder: str | Path) -> dict[str, str]:
    """Return the bos/eos/unk/pad token strings a checkpoint's tokenizer_config.json (or special_tokens_map.json) names."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:  # the legacy layout keeps them in special_tokens_map.json
        config = {**config, **_read_json(folder / "special_tokens_map.json")}
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, Mapping):  # older saves write {"content": ..., "__type": "AddedToken"}
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens
