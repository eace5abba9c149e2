"""Inputs the fuzzers (tests/test_fuzz.py, benchmarks/fuzz.py) found giving another exception than InputError
or a 5xx; each is now refused at its boundary with one line."""

import pytest

from mmlm.data.conversations import read_conversations
from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"image": "a.png", "text": ' + "9" * 5_000 + "}", "invalid JSON"),
    ],
)
def test_json_nested_too_deeply_or_with_a_huge_integer_is_an_input_error(tmp_path, text, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        list(jsonl_rows(path))
    (tmp_path / "conversations.json").write_text(text if text.startswith("[") else f"[{text}]")
    with pytest.raises(InputError, match=message):
        read_conversations(tmp_path / "conversations.json")
