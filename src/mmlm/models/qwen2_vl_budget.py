"""The visual-token budget of Qwen2-VL / Qwen2.5-VL for one image of a given resolution.

Native resolution makes the count depend on the image: an image resized to rows × cols patches is rows·cols
patches in the tower and rows·cols/m² tokens in the LM. The conventions are models/budget.py's (FLOPs = 2 × MACs,
matrix products only, attention over the query–key pairs the mask allows): one image attends to itself in full
blocks and within its windows in Qwen2.5-VL's windowed blocks.
"""

import dataclasses
from dataclasses import dataclass

import torch

from mmlm.layers.flops import kv_cache_bytes, linear_flops, mlp_flops, self_attention_flops
from mmlm.models.budget import LMShape, lm_prefill_flops
from mmlm.models.qwen2_vl import Qwen2VLConfig
from mmlm.models.qwen2_vl_vision import window_order


@dataclass(frozen=True)
class Qwen2VLBudget:
    """One image in Qwen2-VL: its patch grid, LM tokens, FLOPs per stage and KV-cache bytes."""

    grid: tuple[int, int]  # rows × cols of patches after the resize
    patches: int
    visual_tokens: int
    text_tokens: int
    vision_flops: int
    connector_flops: int
    lm_flops: int
    kv_bytes: int
    note: str = ""

    @property
    def total_flops(self) -> int:
        """Return vision + merger + LM prefill FLOPs."""
        return self.vision_flops + self.connector_flops + self.lm_flops

    def to_dict(self) -> dict:
        """Return the plan as JSON-ready data; `styles` holds the one row (the patch merger), as models/budget.py."""
        row = dict(style="patch_merger", kind="patch_merger", visual_tokens=self.visual_tokens, media_tokens=0,
                   vision_flops=self.vision_flops, connector_flops=self.connector_flops, lm_flops=self.lm_flops,
                   kv_bytes=self.kv_bytes, note=self.note, total_flops=self.total_flops)  # fmt: skip
        return dict(dataclasses.asdict(self), total_flops=self.total_flops, styles=[row])


def qwen2_vl_budget(
    cfg: Qwen2VLConfig, grid: tuple[int, int], text_tokens: int, dtype_bytes: int
) -> Qwen2VLBudget:
    """Return the budget of one image of `grid` (rows, cols) patches with `text_tokens` of prompt."""
    v, m2 = cfg.vision, cfg.vision.merge_size**2
    rows, cols = grid
    patches, tokens = rows * cols, rows * cols // m2
    head_dim = v.width // v.heads
    full = patches * patches
    windowed = full
    if v.window_size is not None:
        window = v.window_size // v.merge_size // v.patch_size
        _, lengths = window_order(torch.tensor([[1, rows, cols]]), v.merge_size, window)
        windowed = sum(n * n for n in lengths)
    vision = linear_flops(patches, v.patch_dim, v.width)
    for i in range(v.layers):
        pairs = windowed if v.window_size is not None and i not in v.full_attention_blocks else full
        vision += self_attention_flops(patches, v.width, v.heads, v.heads, head_dim, pairs)
        vision += mlp_flops(patches, v.width, v.mlp_dim, v.gated_mlp)
    merged = v.width * m2
    connector = linear_flops(tokens, merged, merged) + linear_flops(tokens, merged, cfg.lm.width)
    lm = LMShape.from_config(cfg.lm)
    sequence = tokens + text_tokens + 2  # <|vision_start|> and <|vision_end|> around the image
    note = ""
    if sequence > cfg.lm.max_positions:
        note = f"{sequence} tokens exceed the LM's {cfg.lm.max_positions} positions"
    kv = kv_cache_bytes(lm.layers, lm.kv_heads, lm.head_dim, sequence, dtype_bytes)
    return Qwen2VLBudget((rows, cols), patches, tokens, text_tokens, vision, connector,
                         lm_prefill_flops(lm, sequence), kv, note)  # fmt: skip
