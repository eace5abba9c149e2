"""With CI=true a skip for a missing system program or a failed import fails the run (tests/ci_skips.py)."""

import pytest

TESTS = """
import pytest
from system_programs import needs_program, require_program

pytest.importorskip("json")  # present: no skip


@needs_program("no-such-program-mmlm", "no-such-package")
def test_marked():
    pass


def test_required():
    require_program("no-such-program-mmlm", "no-such-package")


def test_imports():
    pytest.importorskip("no_such_module_mmlm")


def test_other_reason():
    pytest.skip("this PyAV build has no libvpx-vp9 encoder")


def test_passes():
    pass
"""

MODULE_LEVEL = """
import pytest

pytest.importorskip("no_such_module_mmlm")


def test_never_runs():
    pass
"""


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_skips=TESTS)
    return pytester


def test_without_ci_they_are_skips(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("-p", "ci_skips", "-rs")
    result.assert_outcomes(passed=1, skipped=4)
    result.stdout.fnmatch_lines(
        ["*missing system program no-such-program-mmlm (apt-get install no-such-package*"]
    )


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_with_ci_a_missing_program_or_import_fails_naming_it(suite, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = suite.runpytest("-p", "ci_skips", "-rs")
    result.assert_outcomes(passed=1, skipped=1, failed=2, errors=1)  # skipif marks act at setup: an error
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        [
            "*CI=true does not allow this skip: missing system program no-such-program-mmlm*",
            "*CI=true does not allow this skip: could not import 'no_such_module_mmlm'*",
        ]
    )
    result.stdout.fnmatch_lines(["SKIPPED*this PyAV build has no libvpx-vp9 encoder"])


@pytest.mark.parametrize("value", ["", "false", "0"])
def test_ci_off_values_keep_skips(suite, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    suite.runpytest("-p", "ci_skips").assert_outcomes(passed=1, skipped=4)


def test_with_ci_a_test_file_that_skips_at_import_fails(pytester, monkeypatch):
    pytester.makepyfile(test_module_skip=MODULE_LEVEL)
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest("-p", "ci_skips").assert_outcomes(skipped=1)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "ci_skips")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*CI=true does not allow this skip: could not import 'no_such_module_mmlm'*"]
    )
