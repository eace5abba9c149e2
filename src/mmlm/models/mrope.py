"""M-RoPE position ids (Qwen2-VL, Wang et al. 2024 §2.1): three rotary axes (temporal, height, width).

A text token sits at position p on all three axes. An image of t × h × w merged tokens that starts at p sits at
(p + frame, p + row, p + column) for each token, and the text after it continues from p + max(t, h, w) (for
images t = 1, so from p + max(h, w)), not from p + t·h·w: an image costs the positions of its longer side.
This is transformers' `get_rope_index` for images; padding is skipped and sits at 0.

During decoding each new token is text: its position is its index among the real tokens plus the prompt's
offset `delta = max position + 1 − real tokens` (transformers' `rope_deltas`).
"""

import itertools

import torch


def mrope_positions(input_ids: torch.Tensor, grids: torch.Tensor | None, image_token_id: int, merge_size: int,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (positions [3, B, T], delta [B]) for ids [B, T] whose image-token runs are, in order, the images of
    `grids` [I, 3] (t, h, w in patches, before merging)."""
    batch, length = input_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    images = iter([] if grids is None else grids.tolist())
    for row in range(batch):
        real = torch.ones(length, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask[row].bool().cpu()
        is_image = (input_ids[row].cpu()[real] == image_token_id).tolist()
        parts, start = [], 0
        for image, run in itertools.groupby(is_image):
            n = len(list(run))
            if not image:
                parts.append(torch.arange(start, start + n).expand(3, n))
                start += n
                continue
            t, h, w = next(images)
            t, h, w = t, h // merge_size, w // merge_size
            axes = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack(axes).reshape(3, -1) + start)  # [3, t·h·w]
            start += max(h, w)  # transformers: the longer side; for video frames t is not counted
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
