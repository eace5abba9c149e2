"""A KV cache whose shapes never change, so that one decode step can be captured as a CUDA graph and replayed.

The growing KVCache and the StaticKVCache hand attention `[:, :, :length]` of their buffers, where `length` is a
Python int that grows each step: every step has new shapes, and the host must know the length. Here the keys and
values live in buffers [B, kv_heads, max_length, head_dim] that attention always reads whole, and everything that
changes from step to step is a device tensor updated in place:

- `slot` [1]: the buffer slot the next token is written to (shared by the rows: prompts are left-padded);
- `keys` [B, max_length]: which slots hold a real key (prompt padding and slots not yet written are False);
- `positions` [B]: each row's next rotary position (left padding takes none).

A call with T new tokens writes them at slots slot … slot + T − 1 with an indexed copy, masks attention over the
whole buffer with `keys` (causal in slots, sliding window in slots, as `build_attention_mask`), and then advances
`slot` and `positions`. Prefill (any T) and decode (T = 1) write the same buffers; each decode step then has
exactly the same shapes and no host-side branch on data. Masked slots add exp(−inf) = 0 to the softmax, so the
outputs equal the growing cache's up to float rounding.
"""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FixedKVCache:
    """One layer's keys and values [B, kv_heads, max_length, head_dim], written at the model's shared `slot`."""

    k: torch.Tensor
    v: torch.Tensor
    slot: torch.Tensor  # [1] long, the FixedDecodeCache's: where this call's first key goes

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, kv_heads, T, head_dim] at slot … slot + T − 1; return the whole buffers."""
        index = self.slot + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v


class FixedDecodeCache(list):
    """Every layer's FixedKVCache plus the decode state they share (`slot`, `keys`, `positions`, see the module
    docstring), and the rotary frequencies as device tensors (`frequencies`): a step that built them from Python
    floats would copy host memory into the captured graph."""

    def __init__(
        self,
        layers: list[FixedKVCache],
        slot: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
        frequencies: dict[tuple[float, ...], torch.Tensor],
    ) -> None:
        super().__init__(layers)
        self.slot, self.keys, self.positions, self.frequencies = slot, keys, positions, frequencies
        self.written = 0  # slots written so far, known on the host without reading the device
        self.runner: Any = (
            None  # the GraphStep that decodes on this cache (inference/graph_step.py), once made
        )

    @classmethod
    def empty(
        cls,
        batch: int,
        layers: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        inv_freqs: list[tuple[float, ...]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> "FixedDecodeCache":
        """Return an empty cache with room for `max_length` slots per row (prompt padding included)."""
        slot = torch.zeros(1, dtype=torch.long, device=device)
        shape = (batch, kv_heads, max_length, head_dim)
        kv = [
            FixedKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), slot)
            for _ in range(layers)
        ]  # fmt: skip
        keys = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        positions = torch.zeros(batch, dtype=torch.long, device=device)
        frequencies = {f: torch.tensor(f, dtype=torch.float32, device=device) for f in inv_freqs}
        return cls(kv, slot, keys, positions, frequencies)

    @property
    def max_length(self) -> int:
        """Return the number of slots the buffers hold."""
        return self.keys.shape[1]

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the tensors a call advances in place: (slot, keys, positions)."""
        return self.slot, self.keys, self.positions

    def write_keys(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor:
        """Mark this call's `length` slots in `keys` (mask [B, T]: False for padding; None: all real), advance
        `positions` past them, and return their position ids [B, T]."""
        batch = self.keys.shape[0]
        new = (
            torch.ones(batch, length, dtype=torch.bool, device=self.keys.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        self.keys.index_copy_(1, self.slot + torch.arange(length, device=new.device), new)
        # cumsum(mask) − 1 from the row's next position, as positions_from_mask; padding: any valid position
        position_ids = (self.positions[:, None] + new.long().cumsum(-1) - 1).masked_fill(~new, 0)
        self.positions.add_(new.sum(-1))
        return position_ids

    def attention_mask(self, length: int, window: int | None) -> torch.Tensor:
        """Return the boolean mask [B, 1, T, max_length] of this call's `length` queries over every slot.

        Query slot q sees key slot k when k ≤ q, k > q − window (sliding window) and `keys` says k holds a real
        key; a padding query sees itself too, so its softmax stays finite (see build_attention_mask).
        """
        device = self.keys.device
        query = (self.slot + torch.arange(length, device=device))[:, None]  # [T, 1]
        key = torch.arange(self.max_length, device=device)[None, :]  # [1, S]
        allowed = (key <= query) & self.keys[:, None, :]  # [B, T, S]
        if window is not None:
            allowed = allowed & (key > query - window)
        return (allowed | (key == query))[:, None]

    def reset(self) -> None:
        """Empty the cache in place for a new batch of prompts: the buffers keep their addresses, so a CUDA graph
        captured on them replays for the next prompts too (the old keys and values stay, masked out)."""
        self.slot.zero_()
        self.keys.zero_()
        self.positions.zero_()
        self.written = 0

    def advance(self, length: int) -> None:
        """Move `slot` past the `length` slots this call wrote (after every layer has written them)."""
        self.slot.add_(length)
