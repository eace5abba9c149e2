"""The VLM trainer's batch stream: a MixingSampler's batches encoded in DataLoader workers, resumable exactly.

Batch b of the sampler's sequence is encoded by worker (b - b0) mod W, b0 the first batch of the pass (W = `workers`, or this process when 0): every
worker replays the sampler from the resume state (its draws cost a few random numbers) and encodes only its own
batches, and the DataLoader hands them back in order, so the sequence does not depend on W. This process replays
the sampler too, one batch per batch received, so its state counts what the trainer consumed, never what the
workers prefetched. Nothing is kept per sample: memory does not grow with the samples drawn.

With `groups` > 1 each sampler draw is a pool of that many batches' samples, cut by length into batches
(mmlm.train.length_grouping), and with `pack` each batch's samples are packed into rows (mmlm.processing.packing);
a worker returns a pool's batches together, and the resume state counts the batches of the current pool taken.

Pixels travel as uint8 where the processor allows (`VLMProcessor.with_uint8_pixels`), in pinned memory on CUDA,
and `device_batch` normalises them on the device.

Samples that cannot be trained on are skipped and counted by reason (`skipped`, SKIP_REASONS); a run of
EMPTY_BATCH_LIMIT batches that lost every sample stops with one line, and so does a worker that dies.
"""

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmlm.data.conversation_records import SampleSkipped
from mmlm.errors import InputError
from mmlm.processing.image import PixelNormalize
from mmlm.processing.packing import pack_samples
from mmlm.processing.vlm_processor import EncodedSample, VLMProcessor
from mmlm.train.length_grouping import group_by_length

EMPTY_BATCH_LIMIT = 20


class DataWorkerError(InputError):
    """A DataLoader worker died or stopped answering; the message says which and how to see its own error."""


@contextlib.contextmanager
def worker_failures_as_errors() -> Iterator[None]:
    """Turn the DataLoader's report of a dead or silent worker into one DataWorkerError line.

    The DataLoader notices a worker's death in a SIGCHLD handler, which raises in whatever the main thread runs
    at that moment (often the training step, not the `next()` that asked for a batch): the trainer wraps its
    whole loop in this, not only the draw.
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if "DataLoader worker" not in text and "DataLoader timed out" not in text:
            raise
        first = text.strip().splitlines()[0]
        raise DataWorkerError(
            f"data: a loader worker failed ({first}); rerun with data.workers=0 to see its error here"
        ) from None


class BatchSampler(Protocol):
    """What the stream needs of a sampler (train/mixing.py's MixingSampler): a seeded sequence of batches of
    (source, index), its position in it, and its resume state."""

    seed: int
    position: int

    def next_batch(self) -> list[tuple[str, int]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Source(Protocol):
    """Samples by index, encoded on each call: EncodedSample, None (too long) or SampleSkipped raised."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> EncodedSample | None: ...


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # W workers each with every core's threads would oversubscribe the CPU


class BatchStream(IterableDataset):
    """Each draw of a sampler's sequence, from its resume state, as its collated (or packed) batches; in a worker,
    only that worker's share."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        sampler: BatchSampler,
        processor: VLMProcessor,
        groups: int = 1,
        pack: bool = False,
    ) -> None:
        self.sources, self.sampler, self.processor = sources, sampler, processor
        self.groups, self.pack = groups, pack

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        sampler = copy.deepcopy(self.sampler)
        start = sampler.position  # the DataLoader asks worker 0 first, whatever the resume position
        while True:
            position = sampler.position
            slots = sampler.next_batch()
            if (position - start) % workers == worker:
                yield self.encode(position, slots)

    def encode(self, position: int, slots: list[tuple[str, int]]) -> dict[str, Any]:
        """Return draw `position`'s batches from its (source, index) slots, and its skips by reason."""
        samples, skipped = [], Counter()
        for source, index in slots:
            try:
                sample = self.sources[source][index]
            except SampleSkipped as skip:
                skipped[skip.reason] += 1
                continue
            if sample is None:
                skipped["too_long"] += 1
                continue
            samples.append(sample)
        parts = [list(range(len(samples)))]
        if self.groups > 1:
            parts = group_by_length(
                [len(s.input_ids) for s in samples], self.groups, self.sampler.seed, position
            )
        batches = [self.collate([samples[i] for i in part]) for part in parts]
        return {"position": position, "skipped": dict(skipped), "batches": batches}

    def collate(self, samples: list[EncodedSample]) -> dict[str, Any]:
        """Return one training batch of `samples`: right-padded rows, or packed rows of max_length tokens."""
        if self.pack and samples:
            return pack_samples(self.processor, samples, self.processor.max_length)
        return self.processor.collate(samples, "right")


def device_batch(
    batch: dict[str, Any], device: torch.device, normalize: PixelNormalize | None
) -> dict[str, Any]:
    """Return a training `batch` on the device, its uint8 pixel_values normalised there (float ones pass unchanged)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if normalize is not None and batch["pixel_values"] is not None:
        batch["pixel_values"] = normalize(batch["pixel_values"])  # float32, as the float path gave
    return batch


class MixedBatches:
    """An endless, resumable stream of collated training batches drawn by a MixingSampler from its sources."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        sampler: BatchSampler,
        processor: VLMProcessor,
        workers: int = 0,
        timeout: float = 0.0,
        groups: int = 1,
        pack: bool = False,
    ) -> None:
        self.sources, self.sampler, self.processor = dict(sources), sampler, processor
        self.workers, self.timeout, self.groups, self.pack = workers, timeout, groups, pack
        self.skipped: Counter[str] = Counter()  # samples skipped by reason, over the whole run
        self.part = 0  # batches of the sampler's current draw already taken (length groups)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = BatchStream(
            self.sources, copy.deepcopy(self.sampler), self.processor, self.groups, self.pack
        )
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers,
                            timeout=self.timeout if self.workers else 0,
                            worker_init_fn=_one_thread if self.workers else None,
                            # its own generator: the loader's seed draw must not move the run's RNG state
                            generator=torch.Generator().manual_seed(self.sampler.seed),
                            pin_memory=torch.cuda.is_available())  # fmt: skip
        batches, empty = iter(loader), 0  # empty: batches in a row whose every sample was dropped
        while True:
            draw = self._next(batches)
            if draw["position"] != self.sampler.position:
                raise RuntimeError(
                    "data: a worker's batch arrived out of order"
                )  # the DataLoader keeps order
            if self.part == 0:  # resumed inside a draw: its skips were counted with its first batch
                self.skipped.update(draw["skipped"])
            for part in range(self.part, len(draw["batches"])):
                batch = draw["batches"][part]
                self.part = part + 1  # this process's count of batches consumed (the resume state)
                if self.part == len(draw["batches"]):
                    self.sampler.next_batch()
                    self.part = 0
                if len(batch["input_ids"]):
                    empty = 0
                    yield batch
                    continue
                empty += 1
                if (
                    empty == EMPTY_BATCH_LIMIT
                ):  # not a data problem that more draws would fix: stop, do not spin
                    raise InputError(self._empty_message(empty))

    def _next(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        with worker_failures_as_errors():
            return next(batches)

    def _empty_message(self, empty: int) -> str:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        message = f"data: the last {empty} batches lost every sample (skipped so far: {counts})"
        if self.skipped["too_long"]:
            message += (
                f"; too_long: their image or audio tokens do not fit in max_length {self.processor.max_length}, "
                "so raise max_length or give each image fewer tokens (fewer frames, video_pool, another connector)"
            )
        return message

    def state_dict(self) -> dict[str, Any]:
        """Return the resume state: the sampler's (batches consumed, samples drawn per source) and skip counts."""
        return {**self.sampler.state_dict(), "skipped": dict(self.skipped), "part": self.part}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the sampler, the skip counts and the position inside the current draw."""
        self.sampler.load_state_dict(state)
        self.skipped = Counter(state.get("skipped", {}))  # absent in checkpoints from before skip counts
        self.part = state.get("part", 0)  # absent in checkpoints from before length groups
