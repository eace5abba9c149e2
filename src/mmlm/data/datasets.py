"""Streaming image-text pairs for training: a seeded, sharded, resumable IterableDataset, its collate and loader.

Order. Epoch e visits the reader's samples in a permutation seeded by (seed, e). Rank r of world_size W
takes every W-th of them: its *stream*, positions 0, 1, ... With K DataLoader workers the stream is cut into
chunks of `batch_size` consecutive positions and chunk c goes to worker c mod K. The DataLoader hands out
one batch from each worker in turn, so, barring skipped samples, the batches are the same for any K.

Randomness. Sample i draws its caption (when it has several) and its augmentation from
`default_rng([seed, epoch, i])`, so it gets the same pixels and caption whatever the rank, worker or resume.

Skips. A corrupt sample (missing or undecodable image, missing or empty caption, truncated tar member) is
skipped before batching, so batches stay full, and counted by reason in `dataset.skipped`.

Resume. The state is (epoch, the positions consumed in the epoch): a prefix `position` plus the few
positions beyond it that were consumed out of order, when a worker skipped a sample and filled its batch
from its next chunk. In the main process (num_workers=0) the dataset records positions as it yields them.
Worker processes hold copies, so each sample carries `progress` (its position and those of the samples
skipped just before it, with reasons; the last skips of a worker ride on a final sample-less item) and
`PairLoader` records the progress of every batch the trainer receives, so prefetched batches do not count.
Worker k of a resumed loader takes the chunks of worker (k + batches consumed) mod K, as the DataLoader
would have asked that worker next. Resuming with the same batch_size and num_workers gives exactly the
batches the run would have given; another num_workers gives exactly the remaining samples in another order.
"""

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmlm.data.augment import PairTransform
from mmlm.data.readers import SKIP_REASONS, CorruptSample, PairReader
from mmlm.errors import InputError
from mmlm.processing.image import MAX_PIXELS, load_image

Progress = tuple[tuple[int, str | None], ...]  # (stream position, skip reason or None for the sample itself)


class PairSample(NamedTuple):
    """One yielded sample: pixels (or a PIL image without a transform), caption, key and stream progress."""

    pixels: torch.Tensor | Image.Image | None  # None: a progress-only item that closes a worker's stream
    caption: str
    key: str
    progress: Progress


class PairDataset(IterableDataset):
    """Image-text pairs from a PairReader, shuffled per epoch, sharded over ranks and workers, resumable."""

    def __init__(
        self,
        reader: PairReader,
        transform: PairTransform | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if len(reader) == 0:
            raise InputError(f"{reader.name}: no samples; expected at least one image-text pair")
        if not 0 <= rank < world_size:
            raise InputError(
                f"rank: got {rank} with world_size={world_size}; expected 0 <= rank < world_size"
            )
        if seed < 0:
            raise InputError(f"seed: got {seed}; expected a non-negative int")
        if batch_size < 1:
            raise InputError(f"batch_size: got {batch_size}; expected at least 1")
        self.reader, self.transform, self.seed, self.shuffle = reader, transform, seed, shuffle
        # batch_size: the loader's batch size; workers take chunks of this many consecutive positions
        self.batch_size, self.rank, self.world_size, self.max_pixels = (
            batch_size,
            rank,
            world_size,
            max_pixels,
        )
        self.epoch = 0
        self.skipped: Counter[str] = Counter()  # reason -> samples skipped, over all passes
        self._position = 0  # every stream position below this one is consumed
        self._ahead: set[int] = set()  # consumed positions beyond _position
        self._batches = 0  # DataLoader batches consumed this epoch (which worker goes first on resume)

    def __len__(self) -> int:
        """Return the number of samples in this rank's epoch, corrupt ones included."""
        return len(range(self.rank, len(self.reader), self.world_size))

    @property
    def consumed(self) -> int:
        """Return how many of this rank's samples the current epoch has consumed (skipped ones included)."""
        return self._position + len(self._ahead)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (for a plain DataLoader with workers; PairLoader counts epochs)."""
        self.epoch, self._position, self._ahead, self._batches = epoch, 0, set(), 0

    def state_dict(self) -> dict[str, Any]:
        """Return the position to resume from, as plain JSON-serialisable values."""
        return {
            "epoch": self.epoch,
            "position": self._position,
            "ahead": sorted(self._ahead),
            "batches": self._batches,
            "skipped": dict(self.skipped),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": len(self.reader),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a state_dict() of a dataset over the same samples, seed and ranks."""
        for field, value in (("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size)):
            if state.get(field) != value:
                raise InputError(
                    f"dataset state: {field}={state.get(field)!r}; this dataset has {field}={value}"
                )
        if state.get("num_samples") != len(self.reader):
            raise InputError(
                f"dataset state: saved for {state.get('num_samples')} samples; "
                f"{self.reader.name} has {len(self.reader)}"
            )
        self.set_epoch(int(state["epoch"]))
        self._position, self._ahead = int(state["position"]), {int(p) for p in state["ahead"]}
        self._batches = int(state["batches"])
        self.skipped = Counter({str(reason): int(n) for reason, n in state["skipped"].items()})

    def record(self, progress: Progress, batches: int = 0) -> None:
        """Mark stream positions consumed and count the skipped ones (PairLoader calls it per batch)."""
        self._batches += batches
        for position, reason in progress:
            if reason is not None:
                self.skipped[reason] += 1
            if position == self._position:
                self._position += 1
                while self._position in self._ahead:
                    self._ahead.remove(self._position)
                    self._position += 1
            elif position > self._position:
                self._ahead.add(position)

    def begin_pass(self) -> None:
        """Move on to the next epoch if this one is used up (a run saved right after its last batch)."""
        if self.consumed >= len(self):
            self.end_pass()

    def end_pass(self) -> None:
        """Count the epoch as done: the next pass starts the next epoch."""
        self.set_epoch(self.epoch + 1)

    def stream(self, epoch: int) -> np.ndarray:
        """Return the reader indices this rank visits in `epoch`, in order."""
        n = len(self.reader)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world_size]

    def _positions(self, worker: int, num_workers: int) -> np.ndarray:
        """Return this worker's unconsumed stream positions, in order."""
        # worker k plays the part of the worker the DataLoader would have asked next after `_batches` batches
        role = (worker + self._batches) % num_workers
        positions = np.arange(self._position, len(self))
        positions = positions[(positions // self.batch_size) % num_workers == role]
        return positions[~np.isin(positions, list(self._ahead))] if self._ahead else positions

    def _load(self, index: int, epoch: int) -> tuple[Any, str, str] | str:
        """Return (pixels, caption, key) for reader sample `index`, or the reason to skip it."""
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            pair = self.reader.read(index)
        except CorruptSample as corrupt:
            return corrupt.reason
        caption = pair.captions[int(rng.integers(len(pair.captions)))]
        if not isinstance(pair.image, bytes) and not pair.image.is_file():
            return "missing_image"
        try:
            if self.transform is None:
                return load_image(pair.image, self.max_pixels), caption, pair.key
            pixels, caption = self.transform(pair.image, caption, rng)
        except (InputError, OSError, SyntaxError, EOFError):  # load_image's InputError, or PIL's own
            return "undecodable_image"
        return pixels, caption, pair.key

    def __iter__(self) -> Iterator[PairSample]:
        """Yield the rest of the current epoch's samples for this rank (and worker)."""
        self.begin_pass()
        info = get_worker_info()
        in_main = info is None
        epoch, stream = self.epoch, self.stream(self.epoch)
        fresh, yielded, skips = self.consumed == 0, 0, 0
        pending: list[tuple[int, str | None]] = []  # skipped positions not yet reported (in a worker)
        # a list made before the loop, as recording consumed positions changes _position and _ahead
        positions = self._positions(0, 1) if in_main else self._positions(info.id, info.num_workers)
        for position in positions.tolist():
            loaded = self._load(int(stream[position]), epoch)
            if isinstance(loaded, str):
                skips += 1
                if in_main:
                    self.record(((position, loaded),))
                else:
                    pending.append((position, loaded))
                continue
            progress, pending = (*pending, (position, None)), []
            if in_main:
                self.record(progress)  # before the yield: a sample counts once the consumer has it
            yielded += 1
            yield PairSample(*loaded, progress)
        if pending:
            yield PairSample(None, "", "", tuple(pending))
        if in_main:
            _check_not_all_skipped(self, fresh and yielded == 0 and skips == len(self))
            self.end_pass()


def _check_not_all_skipped(dataset: PairDataset, all_skipped: bool) -> None:
    if all_skipped:
        raise InputError(
            f"{dataset.reader.name}: every sample of the epoch was skipped ({dict(dataset.skipped)}); "
            "expected readable images and captions (check the image paths or image_root)"
        )


@dataclass
class PairBatch:
    """A batch of pairs: pixels [B, 3, H, W] (or PIL images), captions, tokens [B, L] or None, keys, progress."""

    pixels: torch.Tensor | list[Image.Image]
    captions: list[str]
    keys: list[str]
    tokens: torch.Tensor | None
    progress: Progress

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> "PairBatch":
        """Return the batch with its tensors in pinned memory (the DataLoader calls this with pin_memory=True)."""
        pixels = self.pixels.pin_memory() if isinstance(self.pixels, torch.Tensor) else self.pixels
        tokens = self.tokens.pin_memory() if self.tokens is not None else None
        return PairBatch(pixels, self.captions, self.keys, tokens, self.progress)


@dataclass
class PairCollate:
    """Stacks PairSamples into a PairBatch, tokenizing the captions when given a tokenizer."""

    tokenizer: Callable[[list[str]], torch.Tensor] | None = None  # list of str -> LongTensor [B, L]

    def __call__(self, samples: list[PairSample]) -> PairBatch:
        """Return the batch of the samples, progress-only items merged into its progress."""
        progress = tuple(entry for sample in samples for entry in sample.progress)
        samples = [sample for sample in samples if sample.pixels is not None]
        captions = [sample.caption for sample in samples]
        images = [sample.pixels for sample in samples]
        if images and isinstance(images[0], torch.Tensor):
            pixels = torch.stack(images)  # [B, 3, H, W]
        else:
            pixels = images if images else torch.empty(0, 3, 0, 0)
        tokens = self.tokenizer(captions) if self.tokenizer is not None and captions else None
        return PairBatch(pixels, captions, [sample.key for sample in samples], tokens, progress)


class PairLoader:
    """A DataLoader over a PairDataset that records what the trainer consumed, so its state can resume exactly.

    Batches of `dataset.batch_size`; a batch can be smaller at the end of each worker's share of the epoch.
    Each pass (`for batch in loader`) runs the rest of the current epoch. Workers are not persistent: each
    pass starts them from the dataset's state in this process.
    """

    def __init__(
        self,
        dataset: PairDataset,
        *,
        num_workers: int = 0,
        collate: PairCollate | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
    ) -> None:
        self.dataset, self.num_workers, self.collate = dataset, num_workers, collate or PairCollate()
        self.pin_memory, self.drop_last = pin_memory, drop_last
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context

    def __iter__(self) -> Iterator[PairBatch]:
        """Yield the batches of the rest of the current epoch."""
        dataset = self.dataset
        dataset.begin_pass()  # before the workers copy the dataset
        fresh, yielded, skips = dataset.consumed == 0, 0, 0
        loader = DataLoader(
            dataset,
            batch_size=dataset.batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
        )
        for batch in loader:
            if self.num_workers:  # with num_workers=0 the dataset has recorded its own progress
                dataset.record(batch.progress, batches=1)
                skips += sum(reason is not None for _, reason in batch.progress)
            yielded += len(batch)
            if len(batch) == 0 or (self.drop_last and len(batch) < dataset.batch_size):
                continue
            yield batch
        if self.num_workers:
            _check_not_all_skipped(dataset, fresh and yielded == 0 and skips == len(dataset))
            dataset.end_pass()

    @property
    def skipped(self) -> Counter[str]:
        """Return the skipped-sample counts by reason (one of SKIP_REASONS), over all passes."""
        return self.dataset.skipped

    def state_dict(self) -> dict[str, Any]:
        """Return the dataset's resume state."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the dataset from a state_dict()."""
        self.dataset.load_state_dict(state)


__all__ = ["SKIP_REASONS", "PairBatch", "PairCollate", "PairDataset", "PairLoader", "PairSample", "Progress"]
