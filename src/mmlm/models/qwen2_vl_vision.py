"""The Qwen2-VL / Qwen2.5-VL vision tower: a native-resolution ViT over packed images of any size.

All images of a batch are one sequence of patches [N, C·t·p·p] (the processor's flattening, each image's patches
in merge-window order: every merge_size² consecutive patches form one square block). Then:
  patch embedding   one Linear on the flattened patch (transformers' Conv3d with stride = kernel is that map);
  positions         2-D rotary over each patch's (row, column) in its own image, no learned table;
  attention         restricted to each image (each image its own sequence, as transformers' cu_seqlens split);
  Qwen2.5-VL        RMSNorm + SwiGLU blocks, and windowed attention: outside `full_attention_blocks` a patch
                    sees only its window of window_size px (the patches regrouped window by window first).
The tower returns its last block's states [N, Dv] in the input order; the patch merger (fusion/patch_merger.py)
turns each merge_size² block into one LM token.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from mmlm.layers import Block
from mmlm.layers.rotary import rope_cos_sin, rope_frequencies
from mmlm.models.config import CONFIG_VERSION


@dataclass
class Qwen2VisionConfig:
    """A Qwen2-VL (norm layer, plain MLP) or Qwen2.5-VL (norm rms, gated MLP, windows) vision tower."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    act: str = "quick_gelu"
    norm: str = "layer"  # layer (Qwen2-VL) | rms (Qwen2.5-VL)
    gated_mlp: bool = False  # Qwen2.5-VL: SwiGLU with biases
    norm_eps: float = 1e-6
    channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rope_theta: float = 10000.0
    # Qwen2.5-VL: the window side in pixels; None: every block sees the whole image
    window_size: int | None = None
    full_attention_blocks: list[int] = field(default_factory=list)  # blocks that see the whole image anyway
    version: int = CONFIG_VERSION

    @property
    def patch_dim(self) -> int:
        """Return the length of one flattened patch, C·t·p·p."""
        return self.channels * self.temporal_patch_size * self.patch_size**2


def patch_positions(grids: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Return each patch's (row, column) in its image, [2, N], in the processor's merge-window order."""
    rows, cols = [], []
    for t, h, w in grids.tolist():
        r = torch.arange(h)[:, None].expand(h, w)  # [h, w]
        c = torch.arange(w)[None, :].expand(h, w)
        blocks = (h // merge_size, merge_size, w // merge_size, merge_size)
        # [h, w] -> [h/m, w/m, m, m]: one merge block after another, as the flattening laid them out
        rows.append(r.reshape(blocks).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(blocks).transpose(1, 2).flatten().repeat(t))
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def window_order(grids: torch.Tensor, merge_size: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Return the merge-block order that groups blocks window by window [N/m²], and each window's patch count.

    Each image's merged grid (h/m × w/m) is cut into `window` × `window` squares in row-major order (the last
    row and column of squares may be smaller), as transformers' `get_vision_window_index`.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grids.tolist():
        gh, gw = h // merge_size, w // merge_size
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in index:
            for top in range(0, gh, window):
                for left in range(0, gw, window):
                    cell = frame[top : top + window, left : left + window].flatten()
                    order.append(cell + offset)
                    lengths.append(len(cell) * merge_size**2)
        offset += t * gh * gw
    return torch.cat(order), lengths


def segment_groups(lengths: list[int], device: torch.device) -> list[torch.Tensor]:
    """Return the packed positions of the segments (images or windows) of `lengths`, grouped by length: one
    [k, L] index tensor per distinct length L, the k segments of that length in order."""
    starts = torch.tensor([0, *lengths], device=device).cumsum(0)[:-1]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    return [starts[rows][:, None] + torch.arange(n, device=device) for n, rows in by_length.items()]


def attend_within_segments(
    block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[torch.Tensor]
) -> torch.Tensor:
    """Run `block` on each segment as its own sequence, [N, D] -> [N, D] (cos, sin [N, 1, hd]).

    Segments of one length form one batch, so the cost is Σ L² per segment, not N² as a block-diagonal mask
    over the packed sequence would make it (transformers' cu_seqlens split, in batches).
    """
    out = torch.empty_like(x)
    for index in groups:  # [k, L]
        out[index] = block(x[index], rope=(cos[index], sin[index]))
    return out


class Qwen2VisionTransformer(nn.Module):
    """Packed patches [N, C·t·p·p] of images with grids [I, 3] (t, h, w in patches) -> states [N, Dv]."""

    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # transformers' Conv3d(kernel = stride = (t, p, p)) on one patch is this Linear (tests check the equality)
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width, bias=False)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_dim, act=cfg.act, norm=cfg.norm, eps=cfg.norm_eps,
                  gated_mlp=cfg.gated_mlp, bias=True)
            for _ in range(cfg.layers)
        )  # fmt: skip
        # axial 2-D rotary: head_dim/4 frequencies of a head_dim/2 rotary, the same for rows and columns
        half = rope_frequencies(cfg.width // cfg.heads // 2, cfg.rope_theta)
        self.inv_freq = half + half
        self.sections = (len(half), len(half))

    def windowed(self, layer: int) -> bool:
        """Return whether block `layer` attends within windows (Qwen2.5-VL) rather than the whole image."""
        return self.cfg.window_size is not None and layer not in self.cfg.full_attention_blocks

    def forward(self, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Return the last block's states [N, Dv] for packed patches [N, C·t·p·p] and their grids [I, 3]."""
        cfg, unit = self.cfg, self.cfg.merge_size**2
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))  # [N, C·t·p·p] -> [N, Dv]
        positions = patch_positions(grids, cfg.merge_size).to(x.device)[:, None]  # [2, 1, N]
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype, self.sections)  # [1, N, 1, hd]
        frames = torch.repeat_interleave(grids[:, 1] * grids[:, 2], grids[:, 0]).tolist()
        full = segment_groups(frames, x.device)
        order, windows = None, None
        if any(self.windowed(i) for i in range(cfg.layers)):
            window = cfg.window_size // cfg.merge_size // cfg.patch_size
            blocks, lengths = window_order(grids, cfg.merge_size, window)
            # [N/m²] merge blocks -> [N] patches: whole blocks move, so the merger's groups stay intact
            order = (blocks[:, None] * unit + torch.arange(unit)).flatten().to(x.device)
            x, cos, sin = x[order], cos[:, order], sin[:, order]
            windows = segment_groups(lengths, x.device)
        cos, sin = cos[0], sin[0]  # [N, 1, hd]
        for i, block in enumerate(self.blocks):
            groups = windows if windows is not None and self.windowed(i) else full
            x = attend_within_segments(block, x, cos, sin, groups)
        if order is not None:
            x = x[torch.argsort(order)]
        return x
