"""Fixtures shared by several test files; the CI skip rule (ci_skips.py) and pytester for testing it."""

import os
import random

import numpy as np
import pytest
import torch

from fixtures_models import write_tiny_clip

pytest_plugins = ["pytester", "ci_skips"]


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Each test starts from the same random state, whichever worker runs it and in whatever order.

    MMLM_TEST_SEED picks another state, to look for tests that pass by luck of the draw.
    """
    seed = int(os.environ.get("MMLM_TEST_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random transformers CLIP folder, built once per run; tests only read it."""
    folder = tmp_path_factory.mktemp("clip")
    write_tiny_clip(folder)
    return folder
