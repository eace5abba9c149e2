"""mmlm's own folder format, for every model family: config.json, model.safetensors, and the family's own files.

config.json holds `mmlm_version`, the `architecture` ("dual_encoder", "decoder_lm", "vlm", "audio_encoder": the
key `mmlm.load` dispatches on) and `config`, the model config as a dict (`dataclasses.asdict`). The tensors keep
our own names, so reading them back is an identity key map. A family writes its other files (tokenizer,
preprocessor_config.json, generation_config.json) beside these, and reads them itself.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.keymap import Rule
from mmlm.checkpoints.safetensors_io import read_weights, write_weights
from mmlm.errors import InputError
from mmlm.models.config import config_from_dict

MMLM_VERSION = 1
SAVE_FORMATS = ("auto", "mmlm")
Config = TypeVar("Config")


def write_json(path: Path, data: Any) -> None:
    """Write `data` to `path` as indented JSON with a final newline (how every mmlm folder file is written)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_save_format(format: str) -> None:
    """Raise InputError unless `format` is one `save_pretrained` accepts."""
    if format not in SAVE_FORMATS:
        raise InputError(f"unknown save format {format!r}; expected 'auto' or 'mmlm'")


def mmlm_architecture(cfg_json: dict[str, Any]) -> str | None:
    """Return the architecture an mmlm config.json names, or None for a config.json not written by mmlm."""
    if "mmlm_version" not in cfg_json:
        return None
    return cfg_json.get("architecture")


def write_mmlm(folder: Path, architecture: str, config: Any, weights: dict[str, torch.Tensor]) -> None:
    """Write `weights` under our own names and config.json with the architecture and the config dataclass."""
    write_weights(weights, folder / "model.safetensors")
    cfg = {"mmlm_version": MMLM_VERSION, "architecture": architecture, "config": dataclasses.asdict(config)}
    write_json(folder / "config.json", cfg)


def read_mmlm(
    folder: Path, cfg_json: dict[str, Any], config_type: type[Config], dtype: torch.dtype | None = None
) -> tuple[Config, dict[str, torch.Tensor], list[Rule]]:
    """Return an mmlm folder's config, its tensors (cast to `dtype` as read, if given) and the identity key map."""
    cfg = config_from_dict(config_type, cfg_json["config"])
    weights = read_weights(folder, dtype)
    return cfg, weights, [Rule((k,), (k,)) for k in weights]


def load_mmlm_model(
    folder: Path,
    cfg_json: dict[str, Any],
    config_type: type[Config],
    make_model: Callable[[Config], nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    cast_as_read: bool = False,
) -> nn.Module:
    """Return the model `make_model` builds from an mmlm folder's config, holding its tensors (eval mode).

    `cast_as_read` casts the tensors to `dtype` while reading, so a bf16 load never holds fp32 copies.
    """
    cfg, weights, rules = read_mmlm(folder, cfg_json, config_type, dtype if cast_as_read else None)
    return build_from_weights(lambda: make_model(cfg), weights, rules, str(folder), device, dtype)
