"""JSON and JSON Lines files, read the one way every mmlm reader shares: errors name the file (and line)."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmlm.errors import InputError


def read_text(path: str | Path) -> str:
    """Return the UTF-8 text of `path`; InputError names the file when it is missing, unreadable or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None


def parse_json(text: str, where: str | Path) -> Any:
    """Return the JSON value of `text`; InputError names `where` (a file, or `file:line`) if it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: invalid JSON ({error.msg} at character {error.pos})") from None
    except RecursionError:
        raise InputError(
            f"{where}: JSON nested too deeply for Python's parser; expected a flatter value"
        ) from None
    except ValueError as error:  # an integer of more digits than sys.get_int_max_str_digits() allows
        raise InputError(f"{where}: invalid JSON ({error})") from None


def read_json(path: str | Path) -> Any:
    """Return the JSON value stored in `path`, or raise InputError naming the file."""
    return parse_json(read_text(path), path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Return the JSON object stored in `path`, or raise InputError naming the file."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value) for every non-blank line; InputError names `path:line` on bad JSON."""
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            yield number, parse_json(line, f"{path}:{number}")


def json_items(data: Any, key: str | None, path: str | Path) -> list[Any]:
    """Return data[key] (or data itself when key is None), or raise InputError unless it is a list."""
    items = data.get(key) if key is not None and isinstance(data, dict) else data
    if not isinstance(items, list):
        where = f'a JSON object with a "{key}" list' if key is not None else "a JSON list"
        raise InputError(f"{path}: expected {where}")
    return items


def json_field(item: Any, key: str, where: str) -> Any:
    """Return item[key], or raise InputError naming `where` when item is no object or lacks the key."""
    if not isinstance(item, dict) or key not in item:
        raise InputError(f"{where}: missing field {key!r}")
    return item[key]
