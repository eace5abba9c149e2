"""Training checkpoints: weights as safetensors, optimiser/scheduler/RNG/data position beside them, written
atomically (a temporary folder renamed into place), so a kill at any moment leaves the last one intact; a manifest
of every file's size and sha256 lets a resume name a truncated or altered file instead of loading it.

Under `parallel: fsdp` (mmlm.train.sharding) no rank holds the whole model: the weights and optimiser state are
written by every rank as torch.distributed.checkpoint shards (`*.distcp` and `.metadata`), in the same atomic
folder, beside the same training_state.pt. A resume needs the same number of ranks (the data positions are per rank).
"""

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mmlm.checkpoints.manifest import MANIFEST, verify_manifest, write_manifest
from mmlm.checkpoints.safetensors_io import write_weights
from mmlm.errors import InputError
from mmlm.json_files import read_json_object
from mmlm.train.sharding import is_sharded


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
    _write_training_state(folder, {"step": step, **training_state, "rng": rng_state()})


def _write_training_state(folder: Path, training_state: dict[str, Any]) -> None:
    with (folder / "training_state.pt").open("wb") as f:  # a file object: a failed write raises OSError, not
        torch.save(training_state, f)  # torch's bare RuntimeError
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

    def write(tmp: Path) -> None:
        _empty_folder(tmp)
        _write_checkpoint_files(tmp, step, model, training_state, export)

    return _publish(checkpoint_folder(run_dir, step), step, write)


def _tmp_folder(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def _empty_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _publish(final: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Fill the temporary folder with `write(tmp)`, rename it to `final`, point `latest` at it; return `final`.

    On OSError (a full disk) the partial folder is removed and InputError raised, as save_checkpoint says.
    """
    checkpoints, tmp = final.parent, _tmp_folder(final)
    try:
        write(tmp)
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


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            training_state: dict[str, Any]) -> Path:  # fmt: skip
    """Write checkpoint `step-N` of a model sharded with fully_shard; every rank calls it; return its folder.

    Every rank writes its shards of the weights and optimiser state with torch.distributed.checkpoint into the
    temporary folder; once all have (dcp.save returns after rank 0 wrote the metadata of every rank's files),
    rank 0 adds training_state.pt, holding every rank's RNG state, and the manifest over all the files, and renames
    the folder into place as save_checkpoint does. A failed write on rank 0 raises the same InputError on every rank.
    """
    final, main = checkpoint_folder(run_dir, step), torch_dist.get_rank() == 0
    if main:
        _empty_folder(_tmp_folder(final))
    torch_dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=_tmp_folder(final))
    rngs: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(rngs, rng_state())
    error = [None]
    if main:
        state = {"step": step, **training_state, "rng": rngs}
        try:
            _publish(final, step, lambda folder: _write_training_state(folder, state))
        except InputError as e:
            error = [str(e)]
    torch_dist.broadcast_object_list(error, src=0)  # the other ranks wait here until `latest` names it
    if error[0] is not None:
        raise InputError(error[0])
    return final


def load_sharded_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load this rank's shards of the weights and optimiser state of a sharded checkpoint, restore this rank's RNGs,
    and return the rest of the training state; every rank calls it.

    A parameter that had no gradient yet when the checkpoint was written (the ViT before it unfreezes) has no
    AdamW state in it, and gets none here either: AdamW starts its state at its first gradient, as it did in the
    uninterrupted run.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer)  # every trained parameter's state, zeroed
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    optimizer_state["state"] = {
        name: moments for name, moments in optimizer_state["state"].items()
        if f"optimizer.state.{name}.step" in saved
    }  # fmt: skip
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # fmt: skip
    training_state = torch.load(folder / "training_state.pt", weights_only=False)  # our own file
    set_rng_state(training_state.pop("rng")[torch_dist.get_rank()])
    return training_state


def save_training_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             training_state: dict[str, Any], export: Any = None) -> None:  # fmt: skip
    """Write checkpoint `step-N`; every rank calls it: a sharded model's as shards (save_sharded_checkpoint), any
    other by the first rank alone, the optimiser state in training_state.pt (save_checkpoint, `export` as there)."""
    if is_sharded(model):
        save_sharded_checkpoint(run_dir, step, model, optimizer, training_state)
    elif not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
        save_checkpoint(run_dir, step, model, {**training_state, "optimizer": optimizer.state_dict()}, export)


def load_training_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a checkpoint written by save_training_checkpoint into the model and optimiser, restore the RNGs, and
    return the rest of the training state."""
    if is_sharded(model):
        return load_sharded_checkpoint(folder, model, optimizer)
    state = load_checkpoint(folder, model)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state
