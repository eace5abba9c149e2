"""Fixtures shared by several test files; the CI skip rule (ci_skips.py) and pytester for testing it."""

import pytest

from fixtures_models import write_tiny_clip

pytest_plugins = ["pytester", "ci_skips"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random transformers CLIP folder, built once per run; tests only read it."""
    folder = tmp_path_factory.mktemp("clip")
    write_tiny_clip(folder)
    return folder
