"""Pairs held in memory as uint8 images and token ids, served in seeded shuffled batches.

The position (batches served) is the whole resume state. Images stay uint8 ([N, 3, H, W], a quarter of
float32) and are normalised per batch through the image processor's value table, as at inference.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mmlm.processing.image import ImageProcessor


class InMemoryPairs:
    """Batch b of epoch e is fixed by (seed, e, b), so a run resumes from the batch count alone."""

    def __init__(
        self, images: list, ids: torch.Tensor, processor: ImageProcessor, batch_size: int, seed: int = 0
    ):
        self.pixels = torch.from_numpy(
            np.stack([processor.pixels(im) for im in images]).transpose(0, 3, 1, 2).copy()
        )
        self.table = torch.from_numpy(processor.value_table())  # [3, 256]: uint8 value -> normalised float
        self.ids, self.batch_size, self.seed = ids, batch_size, seed
        self.batches_per_epoch = max(1, len(self.pixels) // batch_size)
        self.position = 0

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return uint8 images [B, 3, H, W] as the model's float32 input."""
        return torch.stack([self.table[c][pixels[:, c].long()] for c in range(3)], dim=1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, b = divmod(self.position, self.batches_per_epoch)
            order = torch.randperm(
                len(self.pixels), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self.position += 1
            yield self.normalise(self.pixels[idx]), self.ids[idx]

    def state_dict(self) -> dict[str, Any]:
        """Return the data position."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a saved data position."""
        self.position = state["position"]
