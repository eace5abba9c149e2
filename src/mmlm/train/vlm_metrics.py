"""What a VLM training run reports: token-weighted losses per modality, throughput and data wait per interval
(`IntervalLosses`), written to metrics.jsonl (with TensorBoard / W&B) and the progress display (`RunLog`)."""

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from mmlm.progress import Progress
from mmlm.train.loggers import MetricLog
from mmlm.train.mixing import ROW_MODALITIES
from mmlm.train.vlm_config import VLMTrainConfig


class IntervalLosses:
    """Token-weighted losses, throughput and the share of time spent waiting for batches since the last log line.

    `data_wait` adds up the seconds the loop spent waiting for its next batch: near 0, the DataLoader workers keep
    ahead of training; near 1, training waits on data, and more `data.workers` would speed it up.
    """

    def __init__(self) -> None:
        self.sums = dict.fromkeys(ROW_MODALITIES, 0.0)
        self.tokens = dict.fromkeys(ROW_MODALITIES, 0)
        self.samples, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    def add(self, row_loss: torch.Tensor, row_tokens: torch.Tensor, modality: torch.Tensor) -> None:
        """Add one micro-batch's per-row loss sums and token counts; `modality` indexes ROW_MODALITIES per row."""
        for index, kind in enumerate(ROW_MODALITIES):
            rows = modality == index
            self.sums[kind] += float(row_loss[rows].sum())
            self.tokens[kind] += int(row_tokens[rows].sum())
        self.samples += len(row_loss)

    def figures(self, world_size: int = 1) -> dict[str, float]:
        """Return loss (all answer tokens), loss_image, loss_audio and loss_text (where seen), samples_per_s and
        data_wait_fraction (seconds waiting for batches over the interval's wall time)."""
        total, seconds = sum(self.tokens.values()), time.perf_counter() - self.start
        out = {"loss": sum(self.sums.values()) / max(total, 1)}
        for kind in ROW_MODALITIES:
            if self.tokens[kind]:
                out[f"loss_{kind}"] = self.sums[kind] / self.tokens[kind]
        out["samples_per_s"] = self.samples * world_size / seconds
        out["data_wait_fraction"] = self.data_wait / seconds
        return out


class RunLog:
    """metrics.jsonl and the progress display, written by the first process only."""

    def __init__(self, run_dir: Path, cfg: VLMTrainConfig, initial: int, main: bool) -> None:
        self.file = MetricLog(run_dir, cfg.log, dataclasses.asdict(cfg), main)  # also TensorBoard / W&B
        self.progress = Progress(cfg.total_steps, initial=initial, desc="train vlm", enabled=main)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and show its losses."""
        self.file.write(record)
        shown = ("loss", "loss_image", "loss_audio", "loss_text", "lr")
        self.progress.update(record["step"], {k: v for k, v in record.items() if k in shown})

    def close(self) -> None:
        """Close the file and the progress bar."""
        self.progress.close()
        self.file.close()
