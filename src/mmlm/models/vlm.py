"""The vision-language model: ViT -> connector -> decoder LM, in every fusion style `connector.kind` names.

Early fusion (LLaVA, Liu et al. 2023): the processor writes one `image_token_id` per visual token where each
`<image>` was; the model embeds the text, then scatters the visual tokens into those slots in order (image by
image, tile by tile, token by token), and the LM reads one mixed sequence. No per-sample Python loop. The
styles (mmlm.fusion: the model asks `self.style`, never its name) differ in what fills the slots:
  linear, mlp, pixel_shuffle, qformer, perceiver   the connector's outputs (N, N/r², K or L per image);
  unified                                          the LM's own embeddings of the image's VQ codes, which sit
                                                   at the end of the LM vocabulary (no connector);
  cross_attention                                  one learned marker per image; the image reaches the LM
                                                   through Flamingo's gated cross-attention blocks instead.

Dynamic resolution (LLaVA-NeXT): an image is a global view plus rows×cols tiles. `patch_merge` "flat" fills
its slots with every tile's tokens in order; "spatial_unpad" (mmlm.models.anyres) gathers, per image, the global
view's tokens, then the tiles' canvas un-padded to the image's aspect ratio with `image_newline` after each row,
so the count depends on the image's size (`image_sizes`), and the processor reserves exactly that many slots.

Video frames are images, `video_pool` of them per slot: the processor groups a video's consecutive frames and the
model merges each group (`video_merge`) before its slots are filled, so a video costs the LM frames / video_pool
images' worth of tokens.

Audio (optional, `cfg.audio`) takes the same road with its own slots: a Whisper-style encoder turns log-mel
features into frames, `audio_pool` consecutive frames are merged (1500 -> 375 with 4), and an audio connector
(any of the token-emitting kinds) maps them to LM width, filling the `audio_token_id` slots each `<audio>`
placeholder became.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion import STYLES, ConnectorConfig, FusionStyle, build_connector, fusion_style
from mmlm.models.anyres import SpatialUnpad
from mmlm.models.audio_encoder import AudioConfig, AudioEncoder, pool_frames
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.decoder_lm import DecoderLM, LayerCache, LMConfig, LMOutput
from mmlm.models.frame_pooling import mean_frames
from mmlm.models.token_merging import merged_token_counts
from mmlm.models.vision import VisionConfig, VisionTransformer


@dataclass
class VLMConfig:
    """A vision tower, a connector and a decoder LM, plus how image features are read and where they go."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(embed_dim=None))
    lm: LMConfig = field(default_factory=LMConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    image_token_id: int = 32000
    feature_layers: list[int] = field(default_factory=lambda: [-2])  # transformers' vision_feature_layer
    feature_select: str = "default"  # default: drop the first token (CLIP's class token) | full: keep all
    feature_norm: bool = (
        False  # apply the tower's final LayerNorm to the features read (Idefics3: last_hidden_state)
    )
    audio: AudioConfig | None = None  # a Whisper-style audio tower; None: no audio input
    audio_connector: ConnectorConfig = field(default_factory=ConnectorConfig)  # encoder frames -> LM width
    audio_pool: int = 4  # consecutive encoder frames merged into one before the audio connector
    audio_pool_mode: str = "mean"  # mean (average them) | stack (concatenate: D -> audio_pool · D)
    audio_token_id: int | None = None  # the `<audio>` slot id; required with `audio`
    # video: each image slot a video gets holds `video_pool` consecutive frames, merged by `video_merge`: mean
    # (their patch features averaged, any connector) | resampler (a perceiver connector reads them together,
    # with its learned time embeddings: connector.max_frames >= video_pool)
    video_pool: int = 1
    video_merge: str = "mean"
    # how an image's tiles (mmlm.processing.anyres) become its tokens: flat (every tile's, global view first) |
    # spatial_unpad (LLaVA-NeXT: un-padded canvas + a newline per row; the grid from image_grid_pinpoints)
    patch_merge: str = "flat"
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)  # [height, width] px grids
    version: int = CONFIG_VERSION

    @property
    def patches(self) -> int:
        """Return the vision tokens per image that reach the connector."""
        v = self.vision
        tokens = v.grid**2 + int(v.class_token)
        if v.merge_tokens:  # ToMe: the deepest feature layer sets the count (layers differ, so use one)
            deepest = max(i % (v.layers + 1) for i in self.feature_layers)
            tokens = ([tokens] + merged_token_counts(tokens, v.layers, v.merge_tokens, v.class_token))[
                deepest
            ]
        return tokens - 1 if self.feature_select == "default" else tokens

    @property
    def audio_frames(self) -> int:
        """Return the pooled audio-encoder frames per clip that reach the audio connector (0 without audio)."""
        return 0 if self.audio is None else self.audio.max_frames // self.audio_pool


class VLMCache(list):
    """The LM's layer caches plus the fusion style's own per-prompt cache (Flamingo's media); selecting rows
    (generation dropping finished ones) selects both."""

    def __init__(self, layers: Iterable[LayerCache], fusion: Any = None) -> None:
        super().__init__(layers)
        self.fusion = fusion

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` of every layer cache and of the style's cache."""
        for layer in self:
            layer.select(rows)
        if self.fusion is not None:
            self.fusion.select(rows)


class VisionLanguageModel(nn.Module):
    """ViT + connector + decoder LM; `forward` takes token ids with image slots and the images' pixels."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        if cfg.vision.merge_tokens and len(cfg.feature_layers) > 1:
            raise InputError(
                "feature_layers: with vision.merge_tokens (ToMe) the layers differ in length; use one"
            )
        if cfg.feature_select not in ("default", "full"):
            raise InputError(f"feature_select: expected 'default' or 'full', got {cfg.feature_select!r}")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        vision_dim = cfg.vision.width * len(cfg.feature_layers)  # several layers are concatenated
        self.connector = build_fusion(cfg, vision_dim)
        self.lm = DecoderLM(cfg.lm)
        self.anyres = spatial_unpad(cfg, self.image_tokens)
        if self.anyres is not None:  # LlavaNextModel's init: N(0, 1/D)
            self.image_newline = nn.Parameter(torch.randn(cfg.lm.width) / cfg.lm.width**0.5)
        check_video(cfg)
        if cfg.audio is not None:
            check_audio(cfg)
            self.audio = AudioEncoder(cfg.audio)
            audio_dim = cfg.audio.width * (cfg.audio_pool if cfg.audio_pool_mode == "stack" else 1)
            self.audio_connector = build_connector(cfg.audio_connector, audio_dim, cfg.lm.width)

    @property
    def kind(self) -> str:
        """Return the fusion style's name, `cfg.connector.kind`."""
        return self.cfg.connector.kind

    @property
    def style(self) -> FusionStyle:
        """Return the fusion style `cfg.connector.kind` names."""
        return fusion_style(self.cfg.connector.kind)

    @property
    def code_offset(self) -> int:
        """Return the LM token id of the style's first added id (unified tokens: image code 0)."""
        return self.cfg.lm.vocab_size - self.style.extra_vocab(self.cfg.connector)

    @property
    def image_tokens(self) -> int:
        """Return the LM tokens one image (or tile) becomes."""
        return self.style.num_tokens(self.connector, self.cfg.patches)

    def new_cache(self, batch: int, length: int | None = None, media: Any = None) -> VLMCache:
        """Return an empty generation cache for `batch` rows (`length` positions: static), carrying the style's
        per-prompt cache built from `media` (what `prepare` returned)."""
        fusion = None if media is None else self.style.generation_cache(media)
        return VLMCache(self.lm.new_cache(batch, length), fusion)

    @property
    def audio_tokens(self) -> int:
        """Return the LM tokens one audio clip becomes (0 without an audio tower)."""
        return 0 if self.cfg.audio is None else self.audio_connector.num_tokens(self.cfg.audio_frames)

    def audio_embeddings(self, audio_features: torch.Tensor) -> torch.Tensor:
        """Return audio tokens in LM width, log-mel [A, n_mels, 2·max_frames] -> [A, audio_tokens, D_lm]."""
        if self.cfg.audio is None:
            raise InputError("audio: this model has no audio tower (its config has no `audio`)")
        frames = self.audio(audio_features)  # [A, max_frames, Da]
        return self.audio_connector(pool_frames(frames, self.cfg.audio_pool, self.cfg.audio_pool_mode))

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return the tower's tokens that reach the connector, [I, 3, H, W] -> [I, N, Dv·layers]."""
        states = self.vision.layer_features(pixel_values, self.cfg.feature_layers)
        if self.cfg.feature_norm:
            states = [self.vision.norm_post(s) for s in states]
        if self.cfg.feature_select == "default":
            states = [s[:, 1:] for s in states]  # as transformers: drops the class token (any first token)
        return torch.cat(states, dim=-1)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Return what fills one image's slots, patch features [I, N, Dv] -> [I, image_tokens, D_lm]."""
        return self.style.slot_tokens(self.connector, features, self.lm)  # [I, N, Dv·layers] -> [I, N', D_lm]

    def slot_tokens(self, features: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Return what fills each image slot from patch features [F, N, Dv] of F frames, `frames[s]` of them
        consecutive per slot s (None: one each) -> [S, image_tokens, D_lm]."""
        if frames is None or bool((frames == 1).all()):
            return self.visual_tokens(features)
        sizes = frames.tolist()
        if self.cfg.video_merge == "resampler":  # [1, T, N, Dv] each: time embeddings tell the frames apart
            return torch.cat([self.connector(g[None]) for g in features.split(sizes)])
        return self.visual_tokens(mean_frames(features, sizes))  # [S, N, Dv]

    def merge_tiles(self, tokens: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """Return the images' tokens in slot order under spatial_unpad, tile tokens [T, g², D] -> [M, D]."""
        if image_sizes is None:
            raise InputError(
                "image_sizes: a spatial_unpad (LLaVA-NeXT) model needs each image's original (height, width)"
            )
        index = self.anyres.gather_index([(h, w) for h, w in image_sizes.tolist()], tokens.shape[0])
        pool = torch.cat([tokens.flatten(0, 1), self.image_newline[None].to(tokens.dtype)])  # [T·g² + 1, D]
        return pool[index.to(pool.device)]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [I, 3, H, W] -> [I, image_tokens, D_lm]."""
        return self.visual_tokens(self.patch_features(pixel_values))

    def prepare(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Return the LM's input embeddings [B, T, D] with the images and audio clips in their slots, and the
        fusion style's per-prompt media (None for most; Flamingo's for its gated blocks). `image_frames` [S] counts the
        pixel_values rows (a video's frames) merged into each image slot; None: one each. `image_sizes` [I, 2]:
        each image's original (height, width), which spatial_unpad needs."""
        is_image = input_ids == self.cfg.image_token_id
        is_audio = input_ids == self.cfg.audio_token_id if self.cfg.audio_token_id is not None else None
        slots = is_image if is_audio is None else is_image | is_audio
        embeds = self.lm.embed(input_ids.masked_fill(slots, 0))
        if audio_features is not None or (is_audio is not None and bool(is_audio.any())):
            audio = self.audio_embeddings(audio_features) if audio_features is not None else None
            embeds = fill_slots(embeds, is_audio, audio, "audio clip", "audio")
        image_slots = int(is_image.sum())
        if pixel_values is None or image_slots == 0:
            if image_slots or pixel_values is not None:
                raise InputError(
                    f"{image_slots} image-token slots but "
                    f"{0 if pixel_values is None else len(pixel_values)} images"
                )
            return embeds, self.style.media(self.connector, input_ids, self.cfg.image_token_id, None)
        features = self.patch_features(pixel_values)
        tokens = self.slot_tokens(features, image_frames)
        if self.anyres is not None:
            images = None if image_sizes is None else len(image_sizes)
            embeds = fill_slots(
                embeds, is_image, self.merge_tiles(tokens, image_sizes), "image", "visual", images
            )
        else:
            embeds = fill_slots(embeds, is_image, tokens, "image", "visual")
        return embeds, self.style.media(self.connector, input_ids, self.cfg.image_token_id, features)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Return the LM's input embeddings [B, T, D] with image features in the image-token slots."""
        return self.prepare(input_ids, pixel_values)[0]

    def run_lm(
        self,
        embeds: torch.Tensor,
        media: Any = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Return the LM's output for input embeddings [B, T, D], the style's hooks reading `media` if any
        (`position_ids` and `segment_ids` [B, T]: samples packed into rows, see DecoderLM.forward)."""
        hook = self.style.before_block(self.connector, media) if media is not None else None
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            last_only=last_only,
            before_block=hook,
            segment_ids=segment_ids,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
        audio_features: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> LMOutput:
        """Return LM logits [B, T, vocab] for ids [B, T] whose image slots are filled from `pixel_values` (and
        audio slots from `audio_features`)."""
        embeds, media = self.prepare(input_ids, pixel_values, audio_features, image_frames, image_sizes)
        return self.run_lm(embeds, media, attention_mask, cache, last_only)


def fill_slots(
    embeds: torch.Tensor,
    is_slot: torch.Tensor | None,
    tokens: torch.Tensor | None,
    item: str,
    kind: str,
    items: int | None = None,
) -> torch.Tensor:
    """Return `embeds` [B, T, D] with `tokens` written, in order, into the positions `is_slot` marks: [I, K, D]
    (K per item), or [M, D] from `items` items of varying length."""
    slots = 0 if is_slot is None else int(is_slot.sum())
    given = 0 if tokens is None else tokens[..., 0].numel()
    if slots != given:
        per = "" if tokens is None or tokens.dim() == 2 else f" ({tokens.shape[1]} each)"
        count = 0 if tokens is None else (items if tokens.dim() == 2 else tokens.shape[0])
        raise InputError(
            f"the text holds {slots} {item}-token slots but {count} {item}(s) give {given} {kind} tokens{per}"
        )
    return embeds if tokens is None else embeds.masked_scatter(is_slot[..., None], tokens.to(embeds.dtype))


def check_video(cfg: VLMConfig) -> None:
    """Raise InputError unless the video settings of `cfg` can be built."""
    if cfg.video_pool < 1:
        raise InputError(f"video_pool: expected at least 1 frame per image slot, got {cfg.video_pool}")
    fusion_style(cfg.connector.kind).check_video(cfg.connector, cfg.video_pool, cfg.video_merge)
    if cfg.video_merge not in ("mean", "resampler"):
        raise InputError(f"video_merge: expected 'mean' or 'resampler', got {cfg.video_merge!r}")


def check_audio(cfg: VLMConfig) -> None:
    """Raise InputError unless the audio settings of `cfg` describe a buildable audio path."""
    if cfg.audio_token_id is None:
        raise InputError("audio_token_id: a model with an audio tower needs the `<audio>` slot id")
    if cfg.audio_pool_mode not in ("mean", "stack"):
        raise InputError(f"audio_pool_mode: expected 'mean' or 'stack', got {cfg.audio_pool_mode!r}")
    if cfg.audio_pool < 1 or cfg.audio.max_frames % cfg.audio_pool:
        raise InputError(
            f"audio_pool: {cfg.audio_pool} must divide the encoder's {cfg.audio.max_frames} frames"
        )
    kinds = [kind for kind, style in STYLES.items() if style.any_length]  # token connectors of any length
    if cfg.audio_connector.kind not in kinds:
        raise InputError(f"audio_connector.kind: got {cfg.audio_connector.kind!r}; expected one of {kinds}")


def spatial_unpad(cfg: VLMConfig, tile_tokens: int) -> SpatialUnpad | None:
    """Return the spatial_unpad merge `cfg.patch_merge` asks for (None for flat); InputError where the connector's
    `tile_tokens` per tile are no square patch grid."""
    if cfg.patch_merge not in ("flat", "spatial_unpad"):
        raise InputError(f"patch_merge: expected 'flat' or 'spatial_unpad', got {cfg.patch_merge!r}")
    if cfg.patch_merge == "flat":
        return None
    side = cfg.vision.grid
    if tile_tokens != side * side:
        raise InputError(
            f"patch_merge 'spatial_unpad': each tile gives {tile_tokens} tokens, expected its {side}x{side} patch "
            "grid (no class token: feature_select 'default' for CLIP, a token-per-patch connector)"
        )
    pinpoints = tuple((int(h), int(w)) for h, w in cfg.image_grid_pinpoints)
    return SpatialUnpad(pinpoints, cfg.vision.image_size, side)


def build_fusion(cfg: VLMConfig, vision_dim: int) -> nn.Module:
    """Return the module between tower and LM that the fusion style `cfg.connector.kind` builds: a connector,
    the Flamingo resampler + gated blocks, the image codebook of unified tokens, ..."""
    return fusion_style(cfg.connector.kind).build(cfg.connector, vision_dim, cfg.lm)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Return next-token cross-entropy: logits at t predict labels at t+1; labels of −100 are ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )
