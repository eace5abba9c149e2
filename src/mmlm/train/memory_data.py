"""Pairs held in memory as uint8 images and token ids, served in seeded shuffled batches.

The position (batches served) is the whole resume state. Images stay uint8 ([N, 3, H, W], a quarter of
float32) and are served so: the trainer normalises each batch on its device (`PixelNormalize`), with the
numbers the image processor gives at inference.
"""

from collections.abc import Iterator
from typing import Any

import torch

from mmlm.processing.image import ImageProcessor


class InMemoryPairs:
    """Batch b of epoch e is fixed by (seed, e, b), so a run resumes from the batch count alone.

    With `pin_memory` (on CUDA) each batch is gathered into pinned memory, so its copy to the device is
    asynchronous: from pageable memory the host would wait for it.
    """

    def __init__(
        self,
        images: list,
        ids: torch.Tensor,
        processor: ImageProcessor,
        batch_size: int,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        self.pixels = processor.uint8(images)  # [N, 3, H, W]
        self.ids, self.batch_size, self.seed, self.pin_memory = ids, batch_size, seed, pin_memory
        self.batches_per_epoch = max(1, len(self.pixels) // batch_size)
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, b = divmod(self.position, self.batches_per_epoch)
            order = torch.randperm(
                len(self.pixels), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self.position += 1
            pixels, ids = self.pixels[idx], self.ids[idx]  # uint8 [B, 3, H, W], token ids [B, L]
            yield (pixels.pin_memory(), ids.pin_memory()) if self.pin_memory else (pixels, ids)

    def state_dict(self) -> dict[str, Any]:
        """Return the data position."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a saved data position."""
        self.position = state["position"]
