"""Load one module of an installed reference package by file, without importing the package.

lmms-eval and LAVIS pull in torch, transformers, loguru and more at import time; the files the metric parity
tests need (lmms-eval's task utils, LAVIS's copy of the official vqaEval.py) import only the standard library
and numpy, so they are loaded on their own from the installed distribution (`make install-dev` installs both
with --no-deps).
"""

import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, distribution
from types import ModuleType

import pytest


def load_reference(dist: str, path: str, stubs: dict[str, object] | None = None) -> ModuleType:
    """Return the module at `path` inside the installed distribution `dist`; skip the test when it is absent.

    `stubs` stands in for modules the file imports but the tested functions never call (a logger, the
    package's heavy `__init__`), present only while the file is executed.
    """
    try:
        location = distribution(dist).locate_file(path)
    except PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (make install-dev installs it)", allow_module_level=True)
    spec = importlib.util.spec_from_file_location(
        f"reference_{dist}_{path}".replace("/", "_").replace(".", "_").replace("-", "_"), location
    )
    module = importlib.util.module_from_spec(spec)
    saved = {name: sys.modules.get(name) for name in stubs or {}}
    sys.modules.update(stubs or {})
    try:
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module
