"""Versioned dataclass configs for mmlm models, and how stored configs load into them.

Every saved config carries a `version`. Loading reads it (missing = 1, what every checkpoint written before
versions were stored has), runs the migrations registered for each older version in order, then builds the
dataclass, ignoring unknown keys with a warning, so old checkpoints keep loading. A config class lives beside the
module it configures (`VisionConfig` in models/vision.py, ...); its migrations live beside it too:

    @migration(VisionConfig, from_version=1)
    def _rename_pool(data):  # version 1 -> 2
        return {**data, "pooling": data.pop("pool", "cls")}
"""

import dataclasses
import typing
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from mmlm.errors import InputError

# the dtype names users and checkpoints write (config.json's torch_dtype, --dtype), each to torch's name
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip

CONFIG_VERSION = 1
T = TypeVar("T")
Migration = Callable[[dict[str, Any]], dict[str, Any]]
# (config class, version it upgrades from) -> the step to version + 1
MIGRATIONS: dict[tuple[type, int], Migration] = {}


def migration(cls: type, from_version: int) -> Callable[[Migration], Migration]:
    """Return a decorator registering a dict -> dict step that upgrades `cls` data from `from_version` by one."""

    def register(step: Migration) -> Migration:
        if (cls, from_version) in MIGRATIONS:
            raise ValueError(f"{cls.__name__}: a migration from version {from_version} is already registered")
        MIGRATIONS[cls, from_version] = step
        return step

    return register


def code_version(cls: type) -> int | None:
    """Return the config version this code writes for `cls` (its `version` default), or None if unversioned."""
    for f in dataclasses.fields(cls):
        if f.name == "version":
            return f.default
    return None


def migrate(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Return stored `cls` data upgraded to the code's version; raise InputError for a version newer than it."""
    current = code_version(cls)
    if current is None:
        return data
    stored = data.get("version", 1)
    if not isinstance(stored, int) or isinstance(stored, bool) or stored < 1:
        raise InputError(f"{cls.__name__}.version: expected a positive integer, got {stored!r}")
    if stored > current:
        raise InputError(
            f"{cls.__name__} version {stored} is newer than this mmlm reads ({current}); upgrade mmlm to load it"
        )
    for version in range(stored, current):
        step = MIGRATIONS.get((cls, version))
        if step is not None:  # a bump that only adds defaulted fields needs no step
            data = step(dict(data))
    return {**data, "version": current} if stored != current else data


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Return `cls` built from stored `data`: migrated to the code's version, nested configs too, unknown keys warned."""
    data = migrate(cls, data)
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
