"""Reading and writing weights as safetensors (single file or sharded with an index). Pickles are refused."""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmlm.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(folder: Path) -> list[Path]:
    """Return the safetensors files of a checkpoint folder, following a shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise InputError(f"{index}: shard {missing[0]} is missing from {folder}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{folder}: only pickled weights ({pickles[0]}) found; mmlm reads safetensors only, since unpickling "
            "can run arbitrary code. Convert them with transformers' save_pretrained(safe_serialization=True)."
        )
    raise InputError(
        f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json)"
    )


def read_weights(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Return every tensor of the folder's safetensors files (memory-mapped), cast to `dtype` if given."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors to one safetensors file (contiguous copies, shared storage broken).

    A failed write (a full disk, say) raises OSError, as Python's own writes do, not safetensors' own error type.
    """
    try:
        save_file(
            {k: v.detach().contiguous().clone() for k, v in tensors.items()},
            str(path),
            metadata={"format": "pt"},
        )
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from error
