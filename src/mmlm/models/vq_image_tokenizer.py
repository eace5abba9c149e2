"""A VQ-GAN image tokenizer (Chameleon's, after Make-A-Scene, Gafni et al. 2022): a convolutional encoder turns
an image into a grid of latent vectors, and each vector becomes the index of its nearest codebook entry,
code(z) = argmin_k ‖z − e_k‖². The codes are the image's words: Chameleon's LM reads them as ordinary ids.

Only the encoder path exists here, as in transformers (`ChameleonVQVAE.encode`); Chameleon's decoder back to
pixels is not released in transformers, so mmlm has none either.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.layers.attention import Attention
from mmlm.models.config import CONFIG_VERSION

GROUPS = 32  # every GroupNorm of the VQ-GAN has 32 groups, so channel counts are multiples of 32


@dataclass
class VQTokenizerConfig:
    """Sizes of the VQ-GAN encoder and its codebook (transformers' ChameleonVQVAEConfig)."""

    embed_dim: int = 256  # width of a code vector
    num_embeddings: int = 8192  # codebook size
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] | None = None
    attn_type: str = "vanilla"  # "vanilla": self-attention in the middle (and at attn_resolutions); else none
    version: int = CONFIG_VERSION

    @property
    def downsample(self) -> int:
        """Return the factor between image side and code-grid side: 2 per level after the first."""
        return 2 ** (len(self.channel_multiplier) - 1)

    def tokens_per_image(self, side: int | None = None) -> int:
        """Return the number of codes for a square image of `side` pixels (default: the training resolution)."""
        grid = (side or self.resolution) // self.downsample
        return grid * grid


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1×1 conv on the shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output [B, out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """x + attention over the H·W positions of GroupNorm(x), one head as wide as the channels.

    The original's 1×1 convolutions q, k, v, proj_out are linears over channels, so mmlm's Attention runs it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.attn = Attention(channels, heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x plus attention output [B, C, H, W]."""
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H·W, C]
        return x + self.attn(seq).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """A stride-2 3×3 conv after padding one pixel on the right and bottom only (the original's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return [B, C, H/2, W/2]."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderLevel(nn.Module):
    """One resolution of the encoder: resnet blocks, each followed by attention at chosen resolutions."""

    def __init__(
        self, in_channels: int, out_channels: int, blocks: int, attention: bool, downsample: bool
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(blocks)
        )
        self.attn = nn.ModuleList(SpatialAttention(out_channels) for _ in range(blocks if attention else 0))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the level's output, halved in size unless it is the last level."""
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x if self.downsample is None else self.downsample(x)


class VQImageTokenizer(nn.Module):
    """Image [B, 3, H, W] -> codes [B, (H/f)·(W/f)] in raster order, f = cfg.downsample."""

    def __init__(self, cfg: VQTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        base, mult = cfg.base_channels, cfg.channel_multiplier
        vanilla = cfg.attn_type == "vanilla"
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)
        widths = [base * m for m in [1, *mult]]
        resolution, levels = cfg.resolution, []
        for i in range(len(mult)):
            attention = vanilla and cfg.attn_resolutions is not None and resolution in cfg.attn_resolutions
            last = i == len(mult) - 1
            levels.append(EncoderLevel(widths[i], widths[i + 1], cfg.num_res_blocks, attention, not last))
            resolution = resolution if last else resolution // 2
        self.down = nn.ModuleList(levels)
        width = widths[-1]
        self.mid_block_1 = ResnetBlock(width, width)
        self.mid_attn_1 = SpatialAttention(width) if vanilla else nn.Identity()
        self.mid_block_2 = ResnetBlock(width, width)
        self.norm_out = nn.GroupNorm(GROUPS, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, cfg.latent_channels * (2 if cfg.double_latent else 1), 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        # read by the decoder, which is not released; kept so checkpoints load and save whole
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.codebook = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)  # [K, D]

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return the continuous latents before quantisation, [B, 3, H, W] -> [B, embed_dim, H/f, W/f]."""
        x = self.conv_in(pixels)
        for level in self.down:
            x = level(x)
        x = self.mid_block_2(self.mid_attn_1(self.mid_block_1(x)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(x))))

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Return the nearest code of each latent vector, [B, D, h, w] -> [B, h·w]."""
        z = latents.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h·w, D]
        e = self.codebook.weight
        # ‖z − e‖² = ‖z‖² + ‖e‖² − 2·z·e, summed in this order as the reference does, so ties break alike
        distance = z.square().sum(-1, keepdim=True) + e.square().sum(-1) - 2 * z @ e.T  # [B, h·w, K]
        return distance.argmin(-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return the image codes [B, h·w] (long) of pixels [B, 3, H, W]."""
        return self.quantize(self.latents(pixels))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the code vectors of `codes`, [...] -> [..., embed_dim] (the quantised latents)."""
        return self.codebook(codes)
