"""Skips for a missing system program, worded so that CI turns them into failures (tests/ci_skips.py).

The programs are optional for mmlm (each has a fallback), so a developer without one still runs the rest of the
suite; `make install-test` installs them, and on CI a test that would skip for want of one fails instead.
"""

import shutil

import pytest

MISSING_PROGRAM = "missing system program"


def missing_program_reason(program: str, package: str) -> str:
    """Return the skip reason for `program`, naming the Debian package that provides it."""
    return f"{MISSING_PROGRAM} {program} (apt-get install {package}; make install-test does it as root)"


def needs_program(program: str, package: str, *aliases: str) -> pytest.MarkDecorator:
    """Return a skipif mark for tests that run `program` (or one of its `aliases`)."""
    found = any(shutil.which(name) for name in (program, *aliases))
    return pytest.mark.skipif(not found, reason=missing_program_reason(program, package))


def require_program(program: str, package: str, *aliases: str) -> str:
    """Return the path of `program` (or of one of its `aliases`); skip the calling test when none is on PATH."""
    for name in (program, *aliases):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(missing_program_reason(program, package))
