"""M-RoPE position ids (Qwen2-VL, Wang et al. 2024 §2.1): three rotary axes (temporal, height, width).

A text token sits at position p on all three axes. An image or video of t × h × w merged tokens that starts at p
sits at (p + time(frame), p + row, p + column) for each token, and the text after it continues from
p + max(h, w), not from p + t·h·w: an image or video costs the positions of its longer side (transformers
counts no time here, even for videos). time(k) = k for images and Qwen2-VL videos; Qwen2.5-VL (Bai et al. 2025
§2.1, absolute time) spaces a video's temporal patches by its seconds per patch: time(k) =
⌊k · tokens_per_second · second_per_grid_t⌋, computed in float32 as transformers' `get_vision_position_ids`.
This is transformers' `get_rope_index`; padding is skipped and sits at 0.

During decoding each new token is text: its position is its index among the real tokens plus the prompt's
offset `delta = max position + 1 − real tokens` (transformers' `rope_deltas`).
"""

import itertools

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def vision_positions(
    start: int, grid: list[int], merge_size: int, time_interval: float = 1.0
) -> torch.Tensor:
    """Return the positions [3, t·h·w/m²] of one image or video of `grid` (t, h, w in patches) starting at
    `start`; temporal patch k sits at start + ⌊k · time_interval⌋ (float32)."""
    t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
    time = (torch.arange(t) * torch.tensor(time_interval, dtype=torch.float32)).long()
    axes = torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(axes).reshape(3, -1) + start  # [3, t·h·w]


def mrope_positions(input_ids: torch.Tensor, grids: torch.Tensor | None, image_token_id: int, merge_size: int,
                    attention_mask: torch.Tensor | None = None, video_grids: torch.Tensor | None = None,
                    video_token_id: int | None = None,
                    time_intervals: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (positions [3, B, T], delta [B]) for ids [B, T] whose image-token runs are, in order, the images of
    `grids` [I, 3] (t, h, w in patches, before merging) and whose video-token runs the videos of `video_grids`
    [V, 3], temporal patch k of video v at ⌊k · time_intervals[v]⌋ past its start (None: k)."""
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    images = iter([] if grids is None else grids.tolist())
    videos = iter([] if video_grids is None else video_grids.tolist())
    intervals = iter([] if time_intervals is None else time_intervals.float().tolist())
    for row in range(batch):
        real = torch.ones(length, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask[row].bool().cpu()
        ids = input_ids[row].cpu()[real]
        kinds = torch.where(ids == image_token_id, IMAGE, TEXT)
        if video_token_id is not None:
            kinds = kinds.masked_fill(ids == video_token_id, VIDEO)
        parts, start = [], 0
        for kind, run in itertools.groupby(kinds.tolist()):
            n = len(list(run))
            if kind == TEXT:
                parts.append(torch.arange(start, start + n).expand(3, n))
                start += n
                continue
            grid = next(images) if kind == IMAGE else next(videos)
            interval = next(intervals, 1.0) if kind == VIDEO else 1.0
            parts.append(vision_positions(start, grid, merge_size, interval))
            start += max(grid[1], grid[2]) // merge_size  # transformers: the longer side; time is not counted
        row_positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        positions[:, row, real] = row_positions
        deltas[row] = (int(row_positions.max()) + 1 if row_positions.numel() else 0) - int(real.sum())
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def decode_positions(deltas: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                     length: int) -> torch.Tensor:  # fmt: skip
    """Return text positions [B, length] of `length` new tokens after `past` cached slots: each token's index
    among its row's real tokens plus the row's M-RoPE offset."""
    if attention_mask is not None:
        index = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -length:]
    else:
        index = torch.arange(past, past + length, device=deltas.device).expand(len(deltas), length)
    return index + deltas[:, None]
