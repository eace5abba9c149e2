"""Fuzzing the input boundaries: mutated image, audio and video files, LLaVA and manifest files, hostile chat
messages through chat templates, and hostile bodies to the server's chat completions endpoint. Every input
gives a result or the one-line InputError (a 4xx in OpenAI's shape from the server), never another exception.

Hypothesis runs derandomized (the same inputs on every run) with a few dozen inputs per target, so this file
takes seconds; benchmarks/fuzz.py runs the same fuzzers at scale.
"""

import json
import struct
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_fuzz import DECODERS, KINDS, apply_mutations, check_one_line
from fixtures_fuzz_server import TEMPLATES, render_messages, server_call, server_seeds, serving_tiny_llava
from mmlm.errors import InputError
from mmlm.processing.chat import PART_TYPES, ROLES
from mmlm.processing.image import load_image


def fuzz_settings(examples: int, seconds: float = 5.0) -> settings:
    """Return reproducible hypothesis settings: `examples` inputs, each within `seconds`."""
    return settings(
        max_examples=examples, deadline=timedelta(seconds=seconds), derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )  # fmt: skip


mutations = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 16), st.integers(0, (1 << 32) - 1)),
    min_size=1, max_size=4,
)  # fmt: skip


def gives_result_or_input_error(call, data: bytes, folder: Path) -> None:
    """Run a target; an InputError must carry a one-line message, any other exception fails the test."""
    try:
        call(data, folder)
    except InputError as error:
        check_one_line(error)


SEEDS = {name: make_seeds() for name, (make_seeds, _) in DECODERS.items()}


@pytest.mark.parametrize("target", sorted(DECODERS))
def test_mutated_files_give_a_result_or_an_input_error(target, tmp_path):
    seeds, call = SEEDS[target], DECODERS[target][1]

    @fuzz_settings(60)
    @given(seed=st.sampled_from(sorted(seeds)), edits=mutations)
    def run(seed: str, edits: list) -> None:
        gives_result_or_input_error(call, apply_mutations(seeds[seed], edits), tmp_path)

    for seed in seeds.values():  # every seed itself is valid
        call(seed, tmp_path)
    run()


def png_declaring(width: int, height: int) -> bytes:
    """Return a PNG whose header declares width x height (CRC correct) over one row of pixel data."""
    body = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" + b"\x80" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", body) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@fuzz_settings(60)
@given(width=st.integers(1, (1 << 31) - 1), height=st.integers(1, (1 << 31) - 1))
def test_a_declared_size_over_max_pixels_is_refused_before_decoding(width, height):
    max_pixels = 1 << 16
    try:
        image = load_image(png_declaring(width, height), max_pixels=max_pixels)
    except InputError as error:
        check_one_line(error)
        if width * height > max_pixels:
            assert "max_pixels" in str(error) or "decompression bomb" in str(error)
        return
    assert width * height <= max_pixels and image.size == (width, height)


# --- chat templates over hostile messages ---------------------------------------------------------------------

odd_text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates and controls included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | odd_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=8,
)
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(PART_TYPES)}, optional={"text": odd_text | json_values, "extra": json_values}
)
messages = st.lists(
    st.fixed_dictionaries({
        "role": st.sampled_from(ROLES) | odd_text,
        "content": odd_text | st.lists(parts, max_size=3) | json_values,
    }),
    max_size=5,
) | json_values  # fmt: skip


@fuzz_settings(150)
@given(messages=messages)
def test_chat_templates_render_hostile_messages_or_refuse_them(messages):
    try:
        render_messages(messages)
    except InputError as error:
        check_one_line(error)


def test_every_fuzzed_template_renders_the_seed_conversation():
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for template in TEMPLATES:
        rendered = template.render(conversation)
        # the span starts where generation starts: the template's gap, then the answer
        answer = rendered.text[slice(*rendered.answer_spans[0])]
        assert answer.removeprefix(template.answer_gap).startswith("hello")


# --- the server's chat completions endpoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def post(tmp_path_factory):
    """The server target: post a body to a tiny LLaVA's /v1/chat/completions, fail on any fault."""
    with serving_tiny_llava(tmp_path_factory.mktemp("llava")) as url:
        yield server_call(url)


BODIES = server_seeds()
FIELDS = ("model", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
          "stream_options", "n", "metadata", "max_completion_tokens", "logprobs")  # fmt: skip


@fuzz_settings(60, seconds=30)
@given(seed=st.sampled_from(sorted(BODIES)), field=st.sampled_from(FIELDS), value=json_values)
def test_a_field_of_any_type_and_size_is_a_result_or_a_4xx(post, tmp_path, seed, field, value):
    body = json.loads(BODIES[seed])
    body[field] = value
    post(json.dumps(body).encode(), tmp_path)


@fuzz_settings(60, seconds=30)
@given(seed=st.sampled_from(sorted(BODIES)), edits=mutations)
def test_mutated_bodies_are_a_result_or_a_4xx(post, tmp_path, seed, edits):
    post(apply_mutations(BODIES[seed], edits), tmp_path)


def test_deep_nesting_huge_numbers_and_odd_unicode_are_4xx(post, tmp_path):
    hostile = [
        b'{"model": "tiny-llava", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
        + b"9" * 5_000
        + b"}",
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "\\udfff\\u202e\\u0000"}]}',
        "\ufeff{}".encode(),
        b"\xff\xfe{",
    ]
    for body in hostile:
        post(body, tmp_path)
