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
        # loss sums and answer tokens per modality, moved to the batches' device by the first add and read back
        # once per log line (`figures`), so a step never waits for the device to report them
        self.sums = torch.zeros(len(ROW_MODALITIES), dtype=torch.float64)
        self.tokens = torch.zeros(len(ROW_MODALITIES), dtype=torch.long)
        self.samples, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    def add(self, row_loss: torch.Tensor, row_tokens: torch.Tensor, modality: torch.Tensor) -> None:
        """Add one micro-batch's per-row loss sums and token counts; `modality` indexes ROW_MODALITIES per row."""
        modality = modality.to(row_loss.device)
        self.sums = self.sums.to(row_loss.device).index_add_(0, modality, row_loss.detach().double())
        self.tokens = self.tokens.to(row_loss.device).index_add_(0, modality, row_tokens.long())
        self.samples += len(row_loss)

    def figures(self, world_size: int = 1) -> dict[str, float]:
        """Return loss (all answer tokens), loss_image, loss_audio and loss_text (where seen), samples_per_s and
        data_wait_fraction (seconds waiting for batches over the interval's wall time)."""
        seconds = time.perf_counter() - self.start
        sums = dict(zip(ROW_MODALITIES, self.sums.tolist(), strict=True))  # the interval's one host read
        tokens = dict(zip(ROW_MODALITIES, self.tokens.tolist(), strict=True))
        out = {"loss": sum(sums.values()) / max(sum(tokens.values()), 1)}
        for kind in ROW_MODALITIES:
            if tokens[kind]:
                out[f"loss_{kind}"] = sums[kind] / tokens[kind]
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
