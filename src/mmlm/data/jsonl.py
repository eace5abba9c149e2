"""JSON Lines files, read the one way every mmlm reader shares: blank lines skipped, errors naming file and line."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmlm.errors import InputError


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value) for every non-blank line; InputError names `path:line` on bad JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        yield number, value
