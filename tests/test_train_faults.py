"""Training under faults: SIGTERM mid-run, a full disk while writing a checkpoint, truncated or altered checkpoints."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_train import TINY, losses_by_step, train_command

import mmlm
from mmlm.checkpoints.manifest import MANIFEST
from mmlm.checkpoints.safetensors_io import write_weights
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from mmlm.train.config import load_train_config
from mmlm.train.run import run_clip_training


def wait_for_steps(run_dir, steps, process, timeout=120):
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_exits_143_and_resumes_exactly(tmp_path):
    steps = ["steps=60"]  # no periodic checkpoints: the only one is written on SIGTERM
    subprocess.run(train_command(tmp_path / "straight", *steps), check=True, capture_output=True)
    victim = subprocess.Popen(train_command(tmp_path / "stopped", *steps), stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path / "stopped", 3, victim)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err
    assert "Traceback" not in err
    latest = json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())
    stop_lines = [line for line in err.splitlines() if "SIGTERM" in line]
    assert stop_lines == [
        f"mmlm: SIGTERM: stopped after step {latest['step']}; checkpoint "
        f"{tmp_path / 'stopped' / 'checkpoints' / latest['path']} written, continue with --resume latest"
    ]
    assert 3 <= latest["step"] < 60 and not (tmp_path / "stopped" / "model").exists()
    subprocess.run(
        train_command(tmp_path / "stopped", *steps, "--resume", "latest"), check=True, capture_output=True
    )
    assert losses_by_step(tmp_path / "stopped") == losses_by_step(tmp_path / "straight")


def torchrun_command(run_dir, *extra):
    """`mmlm train clip` (TINY) under torchrun: two gloo processes on the CPU, one thread each."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mmlm", "train", "clip", *TINY, f"out_dir={run_dir}", *extra]  # fmt: skip


@pytest.mark.slow  # three two-process runs, ~30 s on 2 cores
def test_sigterm_to_torchrun_checkpoints_once_and_every_rank_stops_and_resumes_exactly(tmp_path):
    steps = ["steps=24", "log_every=4"]  # the ranks ask each other about a stop only every 4 steps
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        torchrun_command(tmp_path / "straight", *steps), capture_output=True, text=True, env=env
    )
    assert straight.returncode == 0, straight.stderr[-3000:]  # a failure shows the ranks' own error
    launcher = subprocess.Popen(
        torchrun_command(tmp_path / "stopped", *steps), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env=env,
    )  # fmt: skip
    wait_for_steps(tmp_path / "stopped", 1, launcher)  # step 4 logged
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = launcher.communicate(timeout=120)
    # torchrun re-raises the signal as its SignalException (status 1); each rank exits 143 on its own
    assert launcher.returncode == 1 and "got signal: 15" in err, err[-3000:]
    assert "SIGKILL" not in err, "a rank had to be killed: it did not stop on SIGTERM"
    ranks = [int(pid) for pid in re.findall(r"Sending process (\d+) closing signal SIGTERM", err)]
    assert len(ranks) == 2
    for pid in ranks:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    latest = json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())
    assert [line for line in err.splitlines() if line.startswith("mmlm: SIGTERM")] == [
        f"mmlm: SIGTERM: stopped after step {latest['step']}; checkpoint "
        f"{tmp_path / 'stopped' / 'checkpoints' / latest['path']} written, continue with --resume latest"
    ]  # one line: the first rank speaks; both ranks stopped at the same step, or the save would hang
    assert "RunStopped" not in err and 4 <= latest["step"] < 24 and latest["step"] % 4 == 0
    assert not (tmp_path / "stopped" / "model").exists()
    resumed = subprocess.run(
        torchrun_command(tmp_path / "stopped", *steps, "--resume", "latest"), capture_output=True, text=True,
        env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses_by_step(tmp_path / "stopped") == losses_by_step(tmp_path / "straight")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny CLIP run with checkpoints at steps 1 and 2 (exported as mmlm.load reads them)."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_train_config(None, [*TINY, "steps=3", "checkpoint_every=1", f"out_dir={run}"])
    run_clip_training(cfg)
    return run


@pytest.fixture
def run(checkpoints, tmp_path):
    shutil.copytree(checkpoints / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def latest_weights(run):
    return run / "checkpoints" / "step-0000002" / "model.safetensors"


def truncate_by_one_byte(path):
    os.truncate(path, path.stat().st_size - 1)


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            truncate_by_one_byte,
            r"model\.safetensors: \d+ bytes, but manifest\.json says \d+; the file is truncated",
        ),
        (
            flip_one_byte,
            r"model\.safetensors: sha256 differs from manifest\.json; the file is corrupt or altered",
        ),
        (
            os.remove,
            r"model\.safetensors: missing \(listed in .*manifest\.json\); the checkpoint is incomplete",
        ),
    ],
    ids=["truncated", "flipped", "deleted"],
)
def test_a_damaged_checkpoint_is_named_on_resume_and_load(run, capsys, damage, message):
    damage(latest_weights(run))
    with pytest.raises(InputError, match=message):
        find_checkpoint(run, "latest")
    with pytest.raises(InputError, match=message):
        mmlm.load(latest_weights(run).parent)
    assert main(["train", "clip", *TINY, f"out_dir={run}", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(latest_weights(run)) in err and "Traceback" not in err


def test_a_checkpoint_without_a_manifest_still_resumes(run):
    folder = run / "checkpoints" / "step-0000002"
    (folder / MANIFEST).unlink()  # as written before checkpoints carried one
    assert find_checkpoint(run, "latest") == folder
    model = mmlm.load(folder).model
    assert load_checkpoint(folder, model)["step"] == 2


def test_an_intact_checkpoint_loads_and_lists_every_file(run):
    folder = run / "checkpoints" / "step-0000002"
    listed = set(json.loads((folder / MANIFEST).read_text())["files"])
    assert {"model.safetensors", "config.json", "training_state.pt"} <= listed
    assert listed == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    assert mmlm.load(folder).encode_text(["a red circle"]).shape == (1, 8)


def fill_the_disk_after(written: int):
    """Return a write_weights that writes `written` bytes of the file, then fails as a full disk does."""

    def write(tensors, path):
        path.write_bytes(b"\0" * written)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    state = {"optimizer": {}, "scheduler": {}, "data": [], "records": []}
    first = save_checkpoint(tmp_path, 1, model, state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.nn.init.zeros_(model.weight)
    monkeypatch.setattr("mmlm.train.checkpoint.write_weights", fill_the_disk_after(100))
    expected = (
        f"{tmp_path / 'checkpoints'}: cannot write checkpoint step-0000002 (No space left on device); "
        "latest.json still names step-0000001"
    )
    with pytest.raises(InputError) as raised:
        save_checkpoint(tmp_path, 2, model, state)
    assert str(raised.value) == expected
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-0000001"]
    assert find_checkpoint(tmp_path, "latest") == first
    assert all(torch.equal(before[k], v) for k, v in load_file(str(first / "model.safetensors")).items())


def test_a_full_disk_stops_training_with_one_line(tmp_path, monkeypatch, capsys):
    calls = []

    def write_then_fill(tensors, path):  # the export's first write succeeds, the second meets a full disk
        calls.append(path)
        if len(calls) == 1:
            return write_weights(tensors, path)
        return fill_the_disk_after(1000)(tensors, path)

    monkeypatch.setattr("mmlm.checkpoints.mmlm_format.write_weights", write_then_fill)
    status = main(["train", "clip", *TINY, "steps=3", "checkpoint_every=1", f"out_dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmlm:")]
    assert status == 2
    assert err == [
        f"mmlm: error: {tmp_path / 'checkpoints'}: cannot write checkpoint step-0000002 (No space left on "
        "device); latest.json still names step-0000001"
    ]
    assert find_checkpoint(tmp_path, "latest").name == "step-0000001"


def test_safetensors_write_errors_become_os_errors(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("mmlm.checkpoints.safetensors_io.save_file", full_disk)
    with pytest.raises(OSError) as raised:
        write_weights({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert raised.value.errno == errno.ENOSPC
