"""Stopping a run on SIGTERM or SIGINT: the trainer finishes its step, writes a checkpoint and raises RunStopped.

Schedulers (Slurm, Kubernetes, torchrun) send SIGTERM before they kill a job; Ctrl-C sends SIGINT. The handler
only records the signal, so the optimiser step in flight completes; the loop asks `requested()` after each
step. `mmlm train` then exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the status a
shell reports for a process the signal killed, so a job script can tell a stop from success and from bad
input (2). `--resume latest` continues exactly where it stopped. A second signal acts as it would without us
(SIGTERM kills, SIGINT raises KeyboardInterrupt), so a stuck run can still be ended at once.
"""

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType

import torch
import torch.distributed as torch_dist

from mmlm.train.distributed import DistInfo

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):  # noqa: N818 (a stop, not an error)
    """A training run stopped by a signal after writing its checkpoint; `exit_status` is 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class StopSignals:
    """Within `with`, SIGTERM and SIGINT set a flag instead of ending the process; the previous handlers return
    on exit, or at the first signal so a second one acts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        # signal handlers can only be set from the main thread; elsewhere (a notebook worker) nothing changes
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(
        self, kind: type | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._restore()

    def requested(self, dist: DistInfo) -> bool:
        """Return whether any rank got a stop signal (every rank must stop at the same step, or collectives hang)."""
        if dist.world_size == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=dist.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def requested_at(self, dist: DistInfo, step: int, every: int) -> bool:
        """Return whether to stop after `step`. One process: whenever a signal came. Several: asked only at
        multiples of `every` (the question is an all-reduce and a host read, so not every step), and every rank
        asks at the same steps, so all of them stop together."""
        if dist.world_size > 1 and (not every or step % every):
            return False
        return self.requested(dist)

    def stopped(self, step: int, checkpoint: Path, main: bool) -> RunStopped:
        """Return the RunStopped to raise after the checkpoint of `step` is written; the first rank logs one line."""
        name = signal.Signals(self.signum).name
        message = f"{name}: stopped after step {step}; checkpoint {checkpoint} written, continue with --resume latest"
        if main:
            print(f"mmlm: {message}", file=sys.stderr, flush=True)
        return RunStopped(self.signum, message)
