"""Mean over consecutive frames: what a video slot's frames (`video_pool` per slot) and an audio encoder's
states (`audio_pool` per LM token) are merged by when they are averaged."""

from collections.abc import Sequence

import torch


def mean_frames(frames: torch.Tensor, groups: int | Sequence[int], dim: int = 0) -> torch.Tensor:
    """Return the mean over each group of consecutive frames along `dim`: every `groups` frames (the last group
    may be shorter) or groups of the given sizes, [.., T, ..] -> [.., G, ..]."""
    dim = dim % frames.dim()
    t = frames.shape[dim]
    if isinstance(groups, int) and t % groups == 0:  # one reshape, no Python loop (1500 Whisper frames)
        return frames.reshape(*frames.shape[:dim], t // groups, groups, *frames.shape[dim + 1 :]).mean(
            dim + 1
        )
    return torch.stack([chunk.mean(dim) for chunk in frames.split(groups, dim)], dim)
