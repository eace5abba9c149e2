"""Training checkpoints: weights as safetensors, optimiser/scheduler/RNG/data position beside them, written
atomically (a temporary folder renamed into place), so a kill at any moment leaves the last one intact; a manifest
of every file's size and sha256 lets a resume name a truncated or altered file instead of loading it."""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mmlm.checkpoints.manifest import MANIFEST, verify_manifest, write_manifest
from mmlm.checkpoints.safetensors_io import write_weights
from mmlm.errors import InputError
from mmlm.json_files import read_json_object


def rng_state() -> dict[str, Any]:
    """Return every random generator's state (Python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint_files(folder: Path, step: int, model: torch.nn.Module, training_state: dict[str, Any],
                            export: Any) -> None:  # fmt: skip
    if export is not None:
        export(folder)
    else:
        write_weights(model.state_dict(), folder / "model.safetensors")
    with (folder / "training_state.pt").open("wb") as f:  # a file object: a failed write raises OSError, not
        torch.save({"step": step, **training_state, "rng": rng_state()}, f)  # torch's bare RuntimeError
    write_manifest(folder)
    # on disk before the rename: a full disk then fails here (not later, in delayed allocation), and a power cut
    # cannot leave `latest` pointing at a folder whose data never reached the disk
    for path in folder.rglob("*"):
        _fsync(path)
    _fsync(folder)


def _previous_checkpoint(checkpoints: Path) -> str:
    try:
        return f"latest.json still names {json.loads((checkpoints / 'latest.json').read_text())['path']}"
    except (OSError, ValueError, KeyError):
        return "there is no earlier checkpoint"


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    """Return the folder the checkpoint of `step` is written to."""
    return run_dir / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, training_state: dict[str, Any],
                    export: Any = None) -> Path:  # fmt: skip
    """Write checkpoint `step-N` atomically, with its manifest, and point `latest` at it; return its folder.

    `export(folder)` writes the model as mmlm.load reads it (config.json, model.safetensors with our names,
    tokenizer, preprocessor); without it only model.safetensors is written. A failed write (a full disk)
    removes the partial folder, leaves the previous checkpoint and `latest` as they were, and raises InputError.
    """
    final = checkpoint_folder(run_dir, step)
    checkpoints = final.parent
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_checkpoint_files(tmp, step, model, training_state, export)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = checkpoints / "latest.tmp"
        latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
        _fsync(latest_tmp)
        os.replace(latest_tmp, checkpoints / "latest.json")
        _fsync(checkpoints)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)  # give back the space the partial checkpoint took
        raise InputError(
            f"{checkpoints}: cannot write checkpoint {final.name} ({error.strerror or error}); "
            f"{_previous_checkpoint(checkpoints)}"
        ) from None
    return final


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """Return the checkpoint folder named by `which` ("latest" or a path), its files checked against its manifest.

    Checkpoints written before manifests existed have none: they are returned unchecked, as there is nothing to
    compare their files with.
    """
    if which != "latest":
        folder = Path(which)
        if not (folder / "training_state.pt").is_file() and not (folder / MANIFEST).is_file():
            raise InputError(f"{folder}: not a training checkpoint (no training_state.pt)")
    else:
        latest = run_dir / "checkpoints" / "latest.json"
        if not latest.is_file():
            raise InputError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
        path = read_json_object(latest).get("path")
        if not isinstance(path, str) or not (latest.parent / path).is_dir():
            raise InputError(f"{latest}: names no checkpoint folder beside it ({path!r})")
        folder = latest.parent / path
    verify_manifest(folder)
    return folder


def load_checkpoint(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model`, restore the RNGs, and return the rest of the training state."""
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / "training_state.pt", weights_only=False)  # our own file, written above
    set_rng_state(state.pop("rng"))
    return state
