"""Versioned dataclass configs for mmlm models. Loading tolerates unknown keys (with a warning)."""

import dataclasses
import typing
import warnings
from typing import Any, TypeVar

CONFIG_VERSION = 1
T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Return `cls` built from `data`, recursing into nested configs and warning about unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", stacklevel=2)
    kwargs = {}
    for name in names & set(data):
        value, hint = data[name], hints[name]
        nested = [h for h in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(h)]
        if len(nested) == 1 and isinstance(value, dict):  # `Config` or `Config | None`
            value = config_from_dict(nested[0], value)
        kwargs[name] = value
    return cls(**kwargs)
