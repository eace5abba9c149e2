"""The visual-token budget: how many LM tokens one image becomes, and what they cost in FLOPs and KV cache.

Pure arithmetic on config shapes; no model is built. The conventions, so every number can be checked by hand:
- FLOPs = 2 × multiply-accumulates (MACs), forward pass only. Matrix products only, as
  torch.utils.flop_counter.FlopCounterMode counts them: linear layers and convolutions, and attention's q·kᵀ
  and A·v. Norms, activations, softmax, biases and residual adds are left out (a few percent at most).
- Attention scores cost 4·pairs·heads·head_dim, where pairs are the query–key pairs the mask allows: T² in a
  ViT, T(T+1)/2 in a causal LM prefill (a causal kernel skips the rest; FlopCounterMode counts T² there).
- The LM prefill runs every layer over visual + text tokens and the LM head on the last position only, which
  is all generation needs.
- KV cache = 2 (keys and values) × layers × kv_heads × head_dim × tokens × bytes per value.
- An image is `views` encoder-sized inputs: 1, or LLaVA-NeXT tiles rows×cols plus one global view (as
  mmlm.processing.anyres cuts them), each of `frames` frames. Per-frame styles (projectors, pixel shuffle,
  Q-Former, unified) see ceil(frames / video_pool) slots when `video_pool` frames are averaged per slot (the
  VLM's `video_pool`); the resampler styles read every frame together, as before.
- A LLaVA-NeXT model (spatial_unpad, mmlm.models.anyres) picks the grid from the image's own resolution and
  sends the LM g² + h'·w' + h' tokens (global view, un-padded tile canvas, a newline per row); the other
  styles in its comparison table see the same views, each at its own per-view count.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from mmlm.errors import InputError
from mmlm.fusion import STYLES, ConnectorConfig, FusionInput, fusion_style
from mmlm.layers.flops import (
    cross_attention_flops,
    kv_cache_bytes,
    linear_flops,
    mlp_flops,
    self_attention_flops,
)
from mmlm.models.anyres import SpatialUnpad
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.token_merging import merges_at
from mmlm.models.vision import VisionConfig


def causal_pairs(tokens: int, window: int | None = None) -> int:
    """Return the query–key pairs a causal mask allows: Σᵢ min(i + 1, window) over i < tokens."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


# ---- the vision tower ------------------------------------------------------------------------------------


def patches_per_side(image_size: int, patch_size: int) -> int:
    """Return the patches along one side of a square image: ⌊image_size / patch_size⌋."""
    return image_size // patch_size


def patch_embed_flops(v: VisionConfig, image_size: int) -> int:
    """Return the FLOPs of the stem: one linear map per patch, or the 3×3 stride-2 conv stem then a 1×1."""
    grid = patches_per_side(image_size, v.patch_size)
    if v.stem != "conv":
        return linear_flops(grid * grid, v.channels * v.patch_size**2, v.width)
    steps, side, c, flops = v.patch_size.bit_length() - 1, image_size, v.channels, 0
    for i in range(steps):  # mirrors encoders.vision.ConvStem
        side, out = math.ceil(side / 2), max(v.width // 2 ** (steps - i), 16)
        flops += linear_flops(side * side, c * 9, out)
        c = out
    return flops + linear_flops(side * side, c, v.width)


def tome_matching_flops(tokens: int, head_dim: int) -> int:
    """Return the FLOPs of ToMe's bipartite matching: the |A|×|B| cosine scores of head-averaged keys."""
    return linear_flops((tokens + 1) // 2, head_dim, tokens // 2)


def vit_block_flops(tokens: int, v: VisionConfig, merged: int = 0) -> int:
    """Return the FLOPs of one ViT block on `tokens` tokens; with ToMe its MLP sees `merged` fewer."""
    head_dim = v.width // v.heads
    attention = self_attention_flops(tokens, v.width, v.heads, v.heads, head_dim, tokens * tokens)
    matching = tome_matching_flops(tokens, head_dim) if merged else 0
    return attention + matching + mlp_flops(tokens - merged, v.width, v.mlp_dim)


def encoder_head_flops(v: VisionConfig, tokens: int) -> int:
    """Return the FLOPs after the blocks of a bare encoder: SigLIP's attention-pooling head, the projection."""
    flops = 0
    if v.pool == "map":  # one learned probe cross-attends to every token, then an MLP on that one vector
        flops += cross_attention_flops(1, tokens, v.width, v.width, v.heads, v.width // v.heads)
        flops += mlp_flops(1, v.width, v.mlp_dim)
    return flops + (linear_flops(1, v.width, v.embed_dim) if v.embed_dim else 0)


@dataclass(frozen=True)
class VisionCost:
    """One encoder pass over one view: tokens in, blocks run, tokens out (after ToMe), FLOPs."""

    sequence: int  # tokens into the first block: patches (+ class token)
    blocks: int  # blocks run (a VLM reading layer −2 skips the last)
    tokens: int  # tokens out of the last block run, after ToMe
    flops: int


def vision_tower_cost(
    v: VisionConfig, image_size: int, blocks: int, merge_tokens: int = 0, head: bool = False
) -> VisionCost:
    """Return the cost of `blocks` ViT blocks at `image_size` px, ToMe merging `merge_tokens` per block."""
    grid = patches_per_side(image_size, v.patch_size)
    tokens = sequence = grid * grid + int(v.class_token)
    flops = patch_embed_flops(v, image_size)
    for _ in range(blocks):
        merged = merges_at(tokens, merge_tokens, int(v.class_token))
        flops += vit_block_flops(tokens, v, merged)
        tokens -= merged
    if head:
        flops += encoder_head_flops(v, tokens)
    return VisionCost(sequence, blocks, tokens, flops)


# ---- the language model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMShape:
    """The sizes of a decoder LM that its cost depends on."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab_size: int
    gated_mlp: bool = True  # SwiGLU (Llama family); OPT's MLP has two matrices
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None  # None: every layer uses the window
    max_positions: int | None = None

    @classmethod
    def from_config(cls, cfg: LMConfig) -> "LMShape":
        """Return the shape of an mmlm LMConfig."""
        layers = tuple(cfg.sliding_layers) if cfg.sliding_layers is not None else None
        return cls(cfg.width, cfg.layers, cfg.heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size,
                   cfg.gated_mlp, cfg.sliding_window, layers, cfg.max_positions)  # fmt: skip

    def window(self, layer: int) -> int | None:
        """Return the sliding window of `layer`, or None for full causal attention."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window


def lm_prefill_flops(lm: LMShape, tokens: int) -> int:
    """Return the FLOPs of a causal prefill over `tokens` tokens, the LM head on the last position only."""
    flops = 0
    for layer in range(lm.layers):
        pairs = causal_pairs(tokens, lm.window(layer))
        flops += self_attention_flops(tokens, lm.width, lm.heads, lm.kv_heads, lm.head_dim, pairs)
        flops += mlp_flops(tokens, lm.width, lm.mlp_dim, lm.gated_mlp)
    return flops + linear_flops(1, lm.width, lm.vocab_size)


# ---- one image, every fusion style -----------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """What the budget reads from a model: its vision tower, which features it takes, its connector, its LM."""

    vision: VisionConfig
    lm: LMShape | None = None  # None: a bare image encoder (CLIP, SigLIP)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    feature_layers: tuple[int, ...] = (-1,)  # transformers' hidden_states indices, as VLMConfig
    feature_select: str = "full"  # default: drop the first token (CLIP's class token) | full
    encoder_head: bool = False  # count pooling and projection (a dual encoder's image embedding)
    anyres: SpatialUnpad | None = None  # LLaVA-NeXT's merge: tokens follow the image's resolution


@dataclass(frozen=True)
class ImageInput:
    """How one image reaches the tower: its side, tiles, frames, the prompt's text tokens, ToMe's r."""

    image_size: int
    tiles: tuple[int, int] | None = None  # rows × cols, plus one global view
    frames: int = 1
    text_tokens: int = 32
    merge_tokens: int = 0
    video_pool: int = 1  # frames averaged into one slot before the connector
    resolution: tuple[int, int] | None = None  # the original image's (height, width), for an anyres model

    @property
    def slots(self) -> int:
        """Return the frame slots a per-frame connector fills: ceil(frames / video_pool)."""
        return -(-self.frames // self.video_pool)

    @property
    def views(self) -> int:
        """Return the encoder inputs per frame: 1, or rows·cols tiles + 1 global view."""
        return 1 if self.tiles is None else self.tiles[0] * self.tiles[1] + 1


@dataclass(frozen=True)
class StyleBudget:
    """One image in one fusion style: LM tokens, media tokens (cross-attention), FLOPs, KV-cache bytes."""

    style: str  # "mlp", "pixel_shuffle r=2", "qformer K=32", ...
    kind: str  # ConnectorConfig.kind
    visual_tokens: int | None  # visual tokens in the LM sequence; None: the style does not apply
    media_tokens: int = 0  # cross_attention: the latents every gated block reads
    vision_flops: int = 0
    connector_flops: int = 0
    lm_flops: int = 0  # prefill over visual + text tokens (cross_attention: its gated blocks too)
    kv_bytes: int = 0
    note: str = ""

    @property
    def total_flops(self) -> int:
        """Return vision + connector + LM prefill FLOPs."""
        return self.vision_flops + self.connector_flops + self.lm_flops


@dataclass(frozen=True)
class Budget:
    """The plan for one image: the tower's cost per view and every fusion style's tokens, FLOPs and bytes."""

    image: ImageInput
    patches: int  # patch grid per view before ToMe, e.g. 576 at 336 px for patch 14
    vision: VisionCost  # one view, one frame
    features: int  # tokens per view that reach the connector (after ToMe and feature_select)
    dtype_bytes: int
    styles: list[StyleBudget]  # the model's own connector first; empty for a bare encoder

    @property
    def own(self) -> StyleBudget | None:
        """Return the budget of the model's own connector, or None for a bare encoder."""
        return self.styles[0] if self.styles else None

    @property
    def vision_flops(self) -> int:
        """Return the tower's FLOPs for the whole image (every view and frame)."""
        return self.vision.flops * self.image.views * self.image.frames

    def to_dict(self) -> dict:
        """Return the plan as plain JSON-ready data."""
        return dict(dataclasses.asdict(self), views=self.image.views, vision_flops=self.vision_flops,
                    styles=[dict(dataclasses.asdict(s), total_flops=s.total_flops) for s in self.styles])  # fmt: skip


def blocks_run(backbone: Backbone) -> int:
    """Return the ViT blocks run: all for a bare encoder, up to the deepest feature layer for a VLM."""
    if backbone.encoder_head:
        return backbone.vision.layers
    total = backbone.vision.layers + 1  # hidden_states: the blocks' input, then one per block
    return max(i % total for i in backbone.feature_layers)


def style_budget(
    kind: str, c: ConnectorConfig, x: FusionInput, vision_flops: int, anyres: SpatialUnpad | None = None,
    resolution: tuple[int, int] | None = None,
) -> StyleBudget:  # fmt: skip
    """Return one image's budget in fusion style `kind`: its cost (the style's answer), then the LM prefill and
    KV cache; with `anyres`, the image of `resolution` sends its spatial_unpad count instead."""
    f = fusion_style(kind).cost(c, x)
    if anyres is not None and f.tokens is not None:
        f = dataclasses.replace(f, label=f"{f.label}, spatial_unpad", tokens=anyres.num_tokens(*resolution))
    if f.tokens is None:
        return StyleBudget(f.label, kind, None, note=f.note)
    lm, sequence = x.lm, f.tokens + x.text_tokens
    lm_flops = lm_prefill_flops(lm, sequence) + f.lm_extra_flops
    kv = kv_cache_bytes(lm.layers, lm.kv_heads, lm.head_dim, sequence, x.dtype_bytes) + f.kv_extra_bytes
    note = f.note
    if lm.max_positions is not None and sequence > lm.max_positions:
        note = f"{sequence} tokens exceed the LM's {lm.max_positions} positions"
    return StyleBudget(
        f.label, kind, f.tokens, f.media_tokens, vision_flops, f.connector_flops, lm_flops, kv, note
    )


def comparison_kinds() -> list[str]:
    """Return the fusion styles of the comparison table, in the order of the MULTIMODAL_LLMS chapter."""
    return [kind for kind, style in STYLES.items() if style.comparison is not None]


def comparison_connector(kind: str, own: ConnectorConfig) -> ConnectorConfig:
    """Return the connector options of the comparison row `kind`: the model's own, else the style's own row
    (K = 32 queries for the Q-Former, L = 64 latents for the Perceiver and Flamingo)."""
    if kind == own.kind:
        return own
    return ConnectorConfig(kind=kind, **(fusion_style(kind).comparison or {}))


def anyres_image(backbone: Backbone, image: ImageInput) -> ImageInput:
    """Return `image` with the tiles its resolution gets from an anyres backbone's grids (the tower's square
    when no resolution is given); InputError for a resolution without an anyres model, or with --tiles."""
    if backbone.anyres is None:
        if image.resolution is not None:
            raise InputError("--resolution: only a LLaVA-NeXT (spatial_unpad) model picks its tiles from it")
        return image
    if image.tiles is not None:
        raise InputError("--tiles: a LLaVA-NeXT model picks its grid from the image; give --resolution HxW")
    if image.image_size != backbone.anyres.tile_size:
        raise InputError(
            f"--image-size: got {image.image_size}; a LLaVA-NeXT model's tiles are its tower's "
            f"{backbone.anyres.tile_size} px"
        )
    resolution = image.resolution or (image.image_size, image.image_size)
    return dataclasses.replace(image, tiles=backbone.anyres.grid(*resolution), resolution=resolution)


def plan_budget(backbone: Backbone, image: ImageInput, dtype_bytes: int = 2) -> Budget:
    """Return the budget of one image through `backbone`: tokens, FLOPs per stage and KV cache per style."""
    image = anyres_image(backbone, image)
    v = backbone.vision
    if image.merge_tokens and len(set(backbone.feature_layers)) > 1:
        raise InputError(
            f"--merge-tokens: the model concatenates feature layers {list(backbone.feature_layers)}, which ToMe "
            "leaves with different token counts; use one feature layer"
        )
    cost = vision_tower_cost(
        v, image.image_size, blocks_run(backbone), image.merge_tokens, backbone.encoder_head
    )
    features = cost.tokens - int(backbone.feature_select == "default")
    patches = patches_per_side(image.image_size, v.patch_size) ** 2
    styles: list[StyleBudget] = []
    if backbone.lm is not None:
        own = backbone.connector
        x = FusionInput(features, v.width * len(backbone.feature_layers), backbone.lm, image.views, image.frames,
                        image.slots, image.text_tokens, image.merge_tokens > 0, dtype_bytes)  # fmt: skip
        per_image = cost.flops * image.views * image.frames
        anyres = backbone.anyres, image.resolution
        for kind in [own.kind] + [k for k in comparison_kinds() if k != own.kind]:
            styles.append(style_budget(kind, comparison_connector(kind, own), x, per_image, *anyres))
            anyres = None, None  # the other styles keep their per-view counts
        if styles[0].visual_tokens is None:
            raise InputError(f"connector {styles[0].style}: {styles[0].note.removeprefix('n/a: ')}")
    return Budget(image, patches, cost, features, dtype_bytes, styles)
