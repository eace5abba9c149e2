"""Where training records go: metrics.jsonl always, TensorBoard and Weights & Biases when asked for.

Both trainers hand every record (one dict per `log_every` steps) to one MetricLog; only rank 0 writes.
TensorBoard and W&B are optional packages (`pip install 'mmlm[logging]'`): asking for one that is not
installed stops the run at start-up with one line that names it.
"""

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlm.errors import InputError

INSTALL_HINT = {
    "tensorboard": "pip install tensorboard (or pip install 'mmlm[logging]')",
    "wandb": "pip install wandb (or pip install 'mmlm[logging]')",
}


@dataclass
class LogConfig:
    """Extra sinks for the training records, beside metrics.jsonl and the PNG plots."""

    tensorboard: bool = False  # event files under <out_dir>/tensorboard (`tensorboard --logdir <out_dir>`)
    wandb: str | None = (
        None  # a W&B project name; WANDB_MODE=offline: a local run folder under <out_dir>/wandb
    )


def _require(package: str, option: str) -> Any:
    """Return the imported module `package`, or raise InputError naming it and the pip command."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise InputError(f"{option} needs the {package} package: {INSTALL_HINT[package]}") from None


def check_log_config(cfg: LogConfig) -> None:
    """Raise InputError, naming the option, for a malformed setting or a sink whose package is missing."""
    if not isinstance(cfg.tensorboard, bool):
        raise InputError(f"log.tensorboard: expected true or false, got {cfg.tensorboard!r}")
    if cfg.wandb is not None and (not isinstance(cfg.wandb, str) or not cfg.wandb):
        raise InputError(f"log.wandb: expected a W&B project name, got {cfg.wandb!r}")
    if cfg.tensorboard:
        _require("tensorboard", "log.tensorboard")  # torch.utils.tensorboard's writer needs it
    if cfg.wandb:
        _require("wandb", "log.wandb")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Return the record's numeric figures (not `step`; not text such as a VLM run's `stage`)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class MetricLog:
    """One training run's record sinks: metrics.jsonl, and TensorBoard / W&B as configured (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: LogConfig, config: dict[str, Any], main: bool) -> None:
        self.file, self.tensorboard, self.wandb = None, None, None
        if not main:
            return
        check_log_config(cfg)
        self.file = (run_dir / "metrics.jsonl").open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb:
            wandb = _require("wandb", "log.wandb")
            # each start of a run (a resume too) is its own W&B run, grouped under the run folder's name
            self.wandb = wandb.init(project=cfg.wandb, dir=str(run_dir), config=config,
                                    group=run_dir.resolve().name)  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and send its numeric figures to the other sinks at its step."""
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        figures = scalars(record)
        if self.tensorboard is not None:
            for key, value in figures.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(figures, step=record["step"])

    def close(self) -> None:
        """Flush and close every sink."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
