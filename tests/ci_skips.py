"""pytest plugin: with CI=true, a test skipped for a missing system program or a failed import fails.

Such a skip means the CI machine lacks what `make install-test` should have put there, or that an import is
broken; either way a green run would hide untested code. Skips for other reasons (a codec this PyAV build
lacks, a marker) stay skips. Loaded by tests/conftest.py.
"""

import os

import pytest

from system_programs import MISSING_PROGRAM

IMPORT_FAILURE = "could not import"  # the start of pytest.importorskip's message
FATAL_SKIPS = (MISSING_PROGRAM, IMPORT_FAILURE)


def on_ci() -> bool:
    """Return True when the environment variable CI says this run is CI ("true" or "1", any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def fail_fatal_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn `report` into a failure when CI is on and it was skipped for a missing program or import."""
    if not (report.skipped and on_ci()):
        return
    reason = _skip_reason(report)
    if reason.startswith(FATAL_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"CI=true does not allow this skip: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Fail, on CI, a test whose setup or body skipped for a missing program or import."""
    report = yield
    fail_fatal_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    """Fail, on CI, a test file that skipped itself at import (a module-level importorskip)."""
    report = yield
    fail_fatal_skip(report)
    return report
