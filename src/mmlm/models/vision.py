"""The Vision Transformer (Dosovitskiy et al. 2020): patches -> tokens -> blocks -> pooled embedding.

Images arrive as a [B, C, H, W] batch of one size, or (SigLIP 2's NaFlex, after NaViT) as a `PatchBatch`: each
image at its own aspect ratio, cut into patches, padded to one sequence length, with a mask over the padding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.layers import MLP, Attention, Transformer
from mmlm.layers.init import (
    initialise,
    normal_linear,
    open_clip_transformer_init,
    reset_norms,
    xavier_uniform_fused,
)
from mmlm.layers.transformer import run_block
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.token_merging import merge_block, merge_blocks


@dataclass
class VisionConfig:
    """A ViT: patch embedding, optional class token, learned positions, pre-norm blocks, pooling, projection."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"  # open_clip's for its own from-scratch configs; loaders set OpenAI CLIP's quick_gelu
    norm_eps: float = 1e-5
    channels: int = 3
    class_token: bool = True  # CLIP has one; SigLIP does not
    patch_bias: bool = False  # CLIP's patch conv has no bias; SigLIP's has one
    # patch (one linear map per patch, a strided convolution) | conv (early 3×3 convolutions, for small data) |
    # linear (NaFlex: the patches arrive flattened in a PatchBatch, one nn.Linear maps each)
    stem: str = "patch"
    pre_norm: bool = True  # CLIP's LayerNorm before the blocks ("ln_pre")
    pool: str = "cls"  # cls | mean | map (SigLIP's multihead attention-pooling head)
    embed_dim: int | None = 512  # output projection size; None means no projection (SigLIP)
    proj_bias: bool = False
    merge_tokens: int = 0  # ToMe: tokens merged per block (r); 0 = off (models/token_merging.py)
    # FLIP (Li et al. 2023, open_clip's patch_dropout): the share of patch tokens each training image drops at
    # random before the blocks of the pooled embedding (the class token stays); never at eval, for VLM features,
    # NaFlex patches or ToMe
    patch_dropout: float = 0.0
    # how a patch grid other than image_size/patch_size finds its positions: interpolate (bicubic resize of the
    # learned grid, CLIP/SigLIP) | bucket (Idefics2/3, after NaViT: fractional coordinates bucketed to the grid) |
    # naflex (SigLIP 2: the grid resized bilinearly, with antialiasing, to each image's own patch grid)
    positions: str = "interpolate"
    version: int = CONFIG_VERSION

    @property
    def grid(self) -> int:
        """Return the number of patches per side at the configured resolution."""
        return self.image_size // self.patch_size


@dataclass
class PatchBatch:
    """Images as NaFlex patch sequences (SigLIP 2): each at its own aspect ratio, padded to one length P."""

    patches: torch.Tensor  # [B, P, p·p·C]: each image's patches row by row, each patch (row, column, channel)
    mask: torch.Tensor  # [B, P] bool: True where a patch is real, False where it pads
    shapes: torch.Tensor  # [B, 2] long: each image's patch grid (rows, columns)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PatchBatch":
        """Return the batch on `device`, its patches in `dtype` (mask and shapes keep theirs)."""
        return PatchBatch(self.patches.to(device, dtype), self.mask.to(device), self.shapes.to(device))

    def __len__(self) -> int:
        return self.patches.shape[0]


def naflex_pos_embed(pos: torch.Tensor, grid: int, shapes: torch.Tensor, length: int) -> torch.Tensor:
    """Return each image's positions, [grid², D] -> [B, length, D]: the learned grid resized (bilinear, antialiased,
    as SigLIP 2) to the image's (rows, columns), padded with its first position."""
    dim = pos.shape[-1]
    table = pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2).float()  # [1, D, grid, grid]
    out = pos.new_empty(len(shapes), length, dim)
    resized: dict[tuple[int, int], torch.Tensor] = {}
    for i, (rows, cols) in enumerate(shapes.tolist()):
        if (rows, cols) not in resized:
            grid_pos = F.interpolate(
                table, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True
            )
            resized[rows, cols] = grid_pos.reshape(dim, rows * cols).T.to(pos.dtype)  # [rows·cols, D]
        out[i, : rows * cols] = resized[rows, cols]
        out[i, rows * cols :] = resized[rows, cols][0]
    return out


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Return patch position embeddings bicubically resized from `old_grid` to `new_grid` ([h·w, D] -> [h'·w', D])."""
    if old_grid == new_grid:
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # [1, D, h, w]
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(-1, dim)


def bucket_position_ids(side: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Return the learned-grid position id of each patch of an h×w grid, [h·w], as Idefics3VisionEmbeddings does
    for an unpadded image: patch i of n along a side sits at fraction i/n, bucketed into `side` equal bins.

    The float32 arithmetic is transformers' own: at the native grid it is not always the identity (for a side of
    19, 25, 29, 31, 38, ... a bin boundary rounds below i/n), and parity needs the same ids.
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    ids = []
    for n in grid:
        step = 1.0 / torch.tensor(n, device=device)
        fraction = torch.arange(n, device=device, dtype=torch.float32) * step
        ids.append(torch.bucketize(fraction.clamp(max=1.0 - 1e-6), boundaries, right=True))
    return (ids[0][:, None] * side + ids[1][None, :]).reshape(-1)


def patch_tokens(pixels: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """Return the patch embedding [B, N, D] of pixels [B, C, H, W] and its grid (rows, columns): the strided
    convolution `conv` (kernel = stride = p), computed as one matrix product over the image's p×p patches.

    The same numbers as conv(pixels).flatten(2).transpose(1, 2) up to float summation order (each output is
    the same C·p·p dot product), with the checkpoint's Conv2d weights as they are. A convolution kernel adds
    nothing for non-overlapping patches, and on a GPU it may convert layouts (channels-last) around itself; a
    matmul does not, and its output is already [B, N, D] in memory, where the convolution's needs a transpose.
    Like the convolution, it drops the rows and columns past the last whole patch.
    """
    p = conv.kernel_size[0]
    b, c, h, w = pixels.shape
    rows, columns = h // p, w // p
    patches = pixels[:, :, : rows * p, : columns * p].reshape(b, c, rows, p, columns, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, rows * columns, c * p * p)  # (c, i, j) per patch
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias), (rows, columns)


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3×3 stride-2
    convolutions down to the patch grid, then a 1×1 to the width; it trains faster from scratch than one patch
    projection. [B, C, H, W] -> [B, D, H/p, W/p]."""

    def __init__(self, channels: int, width: int, patch: int) -> None:
        super().__init__()
        steps = patch.bit_length() - 1
        if patch != 2**steps or steps < 1:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch}")
        layers, c = [], channels
        for i in range(steps):
            out = max(width // 2 ** (steps - i), 16)
            layers += [nn.Conv2d(c, out, 3, 2, 1), nn.GELU()]
            c = out
        layers.append(nn.Conv2d(c, width, 1))
        self.layers = nn.Sequential(*layers)
        initialise(self, init_conv_stem)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return the patch-grid features [B, D, H/p, W/p]."""
        return self.layers(pixels)


class AttentionPool(nn.Module):
    """SigLIP's multihead attention-pooling (MAP) head: a learned probe attends over all tokens, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = Attention(dim, heads, cross=True)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)
        initialise(self, init_attention_pool)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return one pooled vector per image, [B, N, D] -> [B, D]; `mask` [B, N] (True = real) hides padding."""
        keys = mask[:, None, None, :] if mask is not None else None  # [B, 1, 1, N]
        x = self.attn(self.probe.expand(tokens.shape[0], -1, -1), context=tokens, mask=keys)
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionTransformer(nn.Module):
    """ViT image encoder with CLIP (class token, ln_pre) and SigLIP (no class token, MAP head) variants."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.positions not in ("interpolate", "bucket", "naflex"):
            raise InputError(
                f"positions: expected 'interpolate', 'bucket' or 'naflex', got {cfg.positions!r}"
            )
        if (cfg.stem == "linear") != (cfg.positions == "naflex"):
            raise InputError("stem='linear' and positions='naflex' go together (NaFlex patch sequences)")
        self.cfg = cfg
        d = cfg.width
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.channels, d, cfg.patch_size)
        elif cfg.stem == "linear":
            self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size**2, d, bias=cfg.patch_bias)
        else:
            self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.class_token = nn.Parameter(torch.randn(d) * d**-0.5) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid**2 + cfg.class_token, d) * 0.02)
        self.norm_pre = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.transformer = Transformer(
            cfg.layers, dim=d, heads=cfg.heads, mlp_dim=cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps
        )
        self.norm_post = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = (
            AttentionPool(d, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps) if cfg.pool == "map" else None
        )
        self.proj = nn.Linear(d, cfg.embed_dim, bias=cfg.proj_bias) if cfg.embed_dim else None
        initialise(self, init_vision_tower)

    def embed(self, pixels: torch.Tensor | PatchBatch) -> torch.Tensor:
        """Return patch tokens plus positions (class token first if any), [B, C, H, W] -> [B, N(+1), D]
        (a PatchBatch: [B, P, p·p·C] -> [B, P, D])."""
        if isinstance(pixels, PatchBatch):
            if self.cfg.stem != "linear":
                raise InputError("a PatchBatch (NaFlex patches) needs a tower with stem='linear'")
            x = self.patch_embed(pixels.patches.to(self.pos_embed.dtype))  # [B, P, D]
            return x + naflex_pos_embed(self.pos_embed, self.cfg.grid, pixels.shapes, x.shape[1])
        if self.cfg.stem == "linear":
            raise InputError("this tower reads NaFlex patches (a PatchBatch), not a [B, C, H, W] image batch")
        pixels = pixels.to(self.pos_embed.dtype)
        if isinstance(self.patch_embed, nn.Conv2d):
            x, grid = patch_tokens(pixels, self.patch_embed)  # [B, N, D]
        else:  # the convolutional stem
            x = self.patch_embed(pixels)  # [B, D, H/p, W/p]
            grid = (x.shape[2], x.shape[3])
            x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self.pos_embed
        n_cls = int(self.class_token is not None)
        if self.cfg.positions == "bucket":
            patches = pos[n_cls:][bucket_position_ids(self.cfg.grid, grid, pos.device)]
        else:
            patches = resize_pos_embed(pos[n_cls:], (self.cfg.grid,) * 2, grid)
        pos = torch.cat([pos[:n_cls], patches])
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)
        return x + pos

    def forward_features(
        self, pixels: torch.Tensor | PatchBatch, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Return (final-normed tokens [B, N(+1), D], per-layer hidden states or None)."""
        x = self.norm_pre(self.embed(pixels))
        if isinstance(pixels, PatchBatch):  # padding patches are never attended to
            x, hidden = self.transformer(
                x, mask=pixels.mask[:, None, None, :], output_hidden_states=output_hidden_states
            )
            return self.norm_post(x), hidden
        if self.cfg.merge_tokens:
            r, has_class = self.cfg.merge_tokens, self.class_token is not None
            x, states = merge_blocks(self.transformer.blocks, x, r, has_class)
            return self.norm_post(x), states if output_hidden_states else None
        x, hidden = self.transformer(x, output_hidden_states=output_hidden_states)
        return self.norm_post(x), hidden

    def layer_features(self, pixels: torch.Tensor | PatchBatch, layers: list[int]) -> list[torch.Tensor]:
        """Return the hidden states [B, N(+1), D] at `layers`, indexed as transformers' `hidden_states`.

        Index 0 is the blocks' input (after ln_pre), i the output of block i, negative indices count from the
        end (LLaVA reads −2, the penultimate block). Blocks after the deepest requested one are not run.
        """
        total = len(self.transformer.blocks) + 1
        wanted = [i % total for i in layers]
        x = self.norm_pre(self.embed(pixels))
        mask = pixels.mask[:, None, None, :] if isinstance(pixels, PatchBatch) else None
        states, size = {0: x}, None
        checkpointed = self.transformer.grad_checkpointing and self.training
        for i, block in enumerate(self.transformer.blocks[: max(wanted)], start=1):
            if self.cfg.merge_tokens:  # ToMe: fewer tokens after each block, so layers differ in length
                x, size = merge_block(block, x, size, self.cfg.merge_tokens, self.class_token is not None)
            else:
                x = run_block(block, x, checkpointed, mask=mask)
            states[i] = x
        return [states[i] for i in wanted]

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the pooled image vector [B, D] by class token, mean over patches, or attention pooling;
        `mask` [B, N] (True = real patch) leaves padding out."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            patches = tokens[:, int(self.class_token is not None) :]
            if mask is None:
                return patches.mean(1)
            weights = mask[..., None].to(patches.dtype)
            return (patches * weights).sum(1) / weights.sum(1)
        return self.head(tokens, mask)

    def drop_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return `tokens` [B, N(+1), D] with a random `patch_dropout` share of each image's patch tokens left out
        (training only; the class token is kept), as open_clip's PatchDropout: each image keeps its own subset."""
        rate = self.cfg.patch_dropout
        if not (self.training and rate > 0):
            return tokens
        n_cls = int(self.class_token is not None)
        patches = tokens[:, n_cls:]
        keep = max(1, int(patches.shape[1] * (1 - rate)))
        kept = torch.rand(patches.shape[:2], device=tokens.device).topk(keep, dim=1).indices  # [B, keep]
        patches = patches.gather(1, kept[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat([tokens[:, :n_cls], patches], dim=1)

    def forward(self, pixels: torch.Tensor | PatchBatch) -> torch.Tensor:
        """Return the (projected, not normalised) image embedding [B, embed_dim or D]."""
        if isinstance(pixels, PatchBatch) or self.cfg.merge_tokens:  # NaFlex and ToMe: the general path
            mask = pixels.mask if isinstance(pixels, PatchBatch) else None
            pooled = self.pool(self.forward_features(pixels)[0], mask)
        else:
            x, _ = self.transformer(self.norm_pre(self.drop_patches(self.embed(pixels))))
            # the final norm is per token, so norming only the class token is equal
            pooled = self.norm_post(x[:, 0]) if self.cfg.pool == "cls" else self.pool(self.norm_post(x))
        return self.proj(pooled) if self.proj is not None else pooled


def init_conv_stem(stem: ConvStem) -> None:
    """Kaiming-normal (fan_out) convolutions and zero biases, as torchvision's ResNets initialise their convolutions.

    open_clip has no convolutional stem to follow; Xiao et al. train theirs from this standard choice.
    """
    for conv in stem.layers:
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)


def init_attention_pool(pool: AttentionPool) -> None:
    """transformers' SigLIP init of the MAP head: probe and in-projection Xavier-uniform (the in-projection as one
    fused [3D, D] matrix), out-projection LeCun-normal, MLP Xavier-uniform with biases N(0, 10⁻¹²), norm identity."""
    dim = pool.probe.shape[-1]
    nn.init.xavier_uniform_(pool.probe)
    for linear in (pool.attn.q, pool.attn.kv):
        xavier_uniform_fused(linear.weight, 3 * dim)
        nn.init.zeros_(linear.bias)
    normal_linear(pool.attn.out, pool.attn.out.weight.shape[1] ** -0.5)  # LeCun normal: N(0, 1/fan_in)
    for linear in (pool.mlp.fc1, pool.mlp.fc2):
        nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(linear.bias, std=1e-6)
    reset_norms(pool)


def init_vision_tower(tower: VisionTransformer) -> None:
    """open_clip's ViT recipe: class token, positions and projection N(0, width⁻¹), the blocks as the text tower's.

    open_clip's `VisionTransformer.init_parameters` keeps PyTorch's defaults for the blocks (its recipe there is
    commented out, "OpenAI CLIP did not define an init"); we apply that recipe, the text tower's, so both towers
    start alike. The patch convolution keeps PyTorch's default, as in open_clip; a conv stem and a MAP head
    initialise themselves (`init_conv_stem`, `init_attention_pool`).
    """
    width = tower.cfg.width
    scale = width**-0.5
    if tower.class_token is not None:
        nn.init.normal_(tower.class_token, std=scale)
    nn.init.normal_(tower.pos_embed, std=scale)
    open_clip_transformer_init(tower.transformer, width)
    for norm in (tower.norm_pre, tower.norm_post):
        reset_norms(norm)
    if tower.proj is not None:
        normal_linear(tower.proj, scale)
