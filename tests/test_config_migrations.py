"""Stored configs carry a version; loading runs the registered migrations in order and refuses newer ones."""

import dataclasses
from dataclasses import dataclass, field

import pytest

from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.audio_encoder import AudioConfig
from mmlm.models.config import MIGRATIONS, config_from_dict, migration
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.dual_encoder import DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig
from mmlm.models.vlm import VLMConfig
from mmlm.train.config import TrainConfig
from mmlm.train.vlm_config import VLMTrainConfig


@dataclass
class PoolConfig:
    """Version 3 of a made-up config: v1 called `size` `width`; v2 stored the kernel as a string."""

    size: int = 4
    kernel: int = 2
    version: int = 3


@dataclass
class HolderConfig:
    """A made-up config nesting PoolConfig, as DualEncoderConfig nests VisionConfig."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    name: str = "holder"
    version: int = 1


@pytest.fixture
def pool_migrations():
    """Register PoolConfig's steps 1 -> 2 -> 3 for one test, then remove them."""
    calls = []

    @migration(PoolConfig, from_version=1)
    def rename_width(data):
        calls.append(1)
        data["size"] = data.pop("width")
        return data

    @migration(PoolConfig, from_version=2)
    def kernel_to_int(data):
        calls.append(2)
        data["kernel"] = int(data["kernel"])
        return data

    yield calls
    del MIGRATIONS[PoolConfig, 1], MIGRATIONS[PoolConfig, 2]


def test_migrations_run_in_order_from_the_stored_version(pool_migrations):
    cfg = config_from_dict(PoolConfig, {"width": 8, "kernel": "3", "version": 1})
    assert cfg == PoolConfig(size=8, kernel=3, version=3)
    assert pool_migrations == [1, 2]


def test_a_missing_version_is_version_1(pool_migrations):
    assert config_from_dict(PoolConfig, {"width": 5, "kernel": "2"}) == PoolConfig(size=5, kernel=2)


def test_only_the_steps_after_the_stored_version_run(pool_migrations):
    assert config_from_dict(PoolConfig, {"size": 6, "kernel": "7", "version": 2}) == PoolConfig(6, 7)
    assert pool_migrations == [2]
    assert config_from_dict(PoolConfig, {"size": 6, "kernel": 7, "version": 3}) == PoolConfig(6, 7)
    assert pool_migrations == [2]


def test_nested_configs_migrate_too(pool_migrations):
    cfg = config_from_dict(HolderConfig, {"pool": {"width": 9, "kernel": "1"}, "name": "old"})
    assert cfg == HolderConfig(pool=PoolConfig(size=9, kernel=1), name="old")


def test_a_version_newer_than_the_code_is_refused():
    with pytest.raises(InputError, match=r"PoolConfig version 4 is newer than this mmlm reads \(3\)") as info:
        config_from_dict(PoolConfig, {"size": 1, "version": 4})
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="VisionConfig version 2 is newer"):
        config_from_dict(DualEncoderConfig, {"vision": {"width": 64, "version": 2}})


def test_a_version_that_is_not_a_positive_integer_is_refused():
    with pytest.raises(InputError, match=r"PoolConfig.version: expected a positive integer, got '2'"):
        config_from_dict(PoolConfig, {"version": "2"})


def test_a_second_migration_for_one_version_is_refused(pool_migrations):
    with pytest.raises(ValueError, match="already registered"):
        migration(PoolConfig, from_version=1)(lambda data: data)


@pytest.mark.parametrize(
    "cls",
    [VisionConfig, TextConfig, AudioConfig, DualEncoderConfig, LMConfig, ConnectorConfig, VLMConfig,
     TrainConfig, VLMTrainConfig],
)  # fmt: skip
def test_every_saved_config_carries_a_version(cls):
    version = {f.name: f.default for f in dataclasses.fields(cls)}.get("version")
    assert isinstance(version, int) and version >= 1
