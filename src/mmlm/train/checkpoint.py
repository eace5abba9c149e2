"""Training checkpoints: weights as safetensors, optimiser/scheduler/RNG/data position beside them, written
atomically (a temporary folder renamed into place), so a kill at any moment leaves the last one intact."""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mmlm.checkpoints.safetensors_io import write_weights
from mmlm.errors import InputError


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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, training_state: dict[str, Any],
                    export: Any = None) -> Path:  # fmt: skip
    """Write checkpoint `step-N` atomically and point `latest` at it; return its folder.

    `export(folder)` writes the model as mmlm.load reads it (config.json, model.safetensors with our names,
    tokenizer, preprocessor); without it only model.safetensors is written.
    """
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if export is not None:
        export(tmp)
    else:
        write_weights(model.state_dict(), tmp / "model.safetensors")
    torch.save({"step": step, **training_state, "rng": rng_state()}, tmp / "training_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = run_dir / "checkpoints" / "latest.json"
    latest_tmp = latest.with_suffix(".tmp")
    latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(latest_tmp, latest)
    return final


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """Return the checkpoint folder named by `which`: "latest" or a path."""
    if which != "latest":
        path = Path(which)
        if not (path / "training_state.pt").is_file():
            raise InputError(f"{path}: not a training checkpoint (no training_state.pt)")
        return path
    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.is_file():
        raise InputError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
    return run_dir / "checkpoints" / json.loads(latest.read_text())["path"]


def load_checkpoint(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model`, restore the RNGs, and return the rest of the training state."""
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = torch.load(folder / "training_state.pt", weights_only=False)  # our own file, written above
    set_rng_state(state.pop("rng"))
    return state
