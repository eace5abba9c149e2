"""Pairs held in memory as tensors, served in seeded shuffled batches; the position is the batch count."""

from collections.abc import Iterator
from typing import Any

import torch


class InMemoryPairs:
    """Pre-processed images [N, 3, H, W] and token ids [N, L]; batch b of epoch e is fixed by (seed, e, b)."""

    def __init__(self, pixels: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.pixels, self.ids, self.batch_size, self.seed = pixels, ids, batch_size, seed
        self.batches_per_epoch = max(1, len(pixels) // batch_size)
        self.position = 0  # batches served so far

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, b = divmod(self.position, self.batches_per_epoch)
            order = torch.randperm(
                len(self.pixels), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self.position += 1
            yield self.pixels[idx], self.ids[idx]

    def state_dict(self) -> dict[str, Any]:
        """Return the data position."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a saved data position."""
        self.position = state["position"]
