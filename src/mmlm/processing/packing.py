"""Sequence packing: several training samples in one row, each kept whole and apart from the others.

A batch of short samples right-padded to its longest row spends most of its compute on padding. Packing puts
samples end to end in rows of at most `row_length` tokens (first-fit decreasing), so far fewer rows carry the
same samples. Each sample stays what it was alone:
  - whole: a sample (its image tokens with it) goes in one row or, too long for any, in none;
  - `segment_ids` [R, L] number the samples of a row (padding: -1), and the LM's attention mask keeps each
    slot to its own sample's slots (block-diagonal and causal);
  - `position_ids` [R, L] restart at 0 with every sample;
  - the label of each sample's first token is dropped (-100): the token before it belongs to another sample,
    which must not learn to predict it (unpacked, that first label is never a target either).
Images and audio clips stay in slot order, so the model fills their slots as in any batch.
"""

from collections.abc import Sequence
from typing import Any

import torch

from mmlm.errors import InputError
from mmlm.processing.vlm_processor import IGNORE_INDEX, EncodedSample, VLMProcessor


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Return rows of sample indices, first-fit decreasing by length: each row's lengths sum to ≤ `row_length`.

    Ties keep the samples' order, so the packing is a function of the lengths alone.
    """
    if any(n > row_length for n in lengths):
        raise InputError(f"packing: a sample of {max(lengths)} tokens does not fit in a row of {row_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(row_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_samples(
    processor: VLMProcessor, samples: Sequence[EncodedSample], row_length: int
) -> dict[str, Any]:
    """Return a packed training batch of `samples`: `processor.collate`'s keys with input_ids, labels,
    attention_mask, position_ids and segment_ids [R, L] of the packed rows, plus sample_index [R, L] (the
    sample each token is, in the batch's packed order; -1 for padding) and packed_order [N] (the index in
    `samples` of each packed sample). Per-sample keys (images_per_sample, audio_per_sample, pixel_values ...)
    are in that packed order too."""
    rows = pack_rows([len(s.input_ids) for s in samples], row_length)
    order = [i for row in rows for i in row]
    packed = [samples[i] for i in order]
    batch = processor.collate(packed, "right")  # the media, per sample, in packed (slot) order
    width = max((sum(len(samples[i].input_ids) for i in row) for row in rows), default=0)
    shape = (len(rows), width)
    input_ids = torch.full(shape, processor.pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    sample_index = torch.full(shape, -1, dtype=torch.long)
    number = 0
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row):
            sample, n = samples[i], len(samples[i].input_ids)
            span = slice(start, start + n)
            input_ids[r, span], labels[r, span] = sample.input_ids, sample.labels
            labels[r, start] = IGNORE_INDEX  # its previous token is another sample's
            positions[r, span] = torch.arange(n)
            segments[r, span], sample_index[r, span] = segment, number
            start, number = start + n, number + 1
    batch.update(input_ids=input_ids, labels=labels, attention_mask=(segments >= 0).long(),
                 position_ids=positions, segment_ids=segments, sample_index=sample_index,
                 packed_order=torch.tensor(order, dtype=torch.long))  # fmt: skip
    return batch
