"""Qwen2-VL and Qwen2.5-VL (Wang et al. 2024; Bai et al. 2025): native-resolution vision tower -> patch merger ->
Qwen2 LM with M-RoPE.

Images keep their own size: each becomes t·h·w/m² LM tokens (the processor reserves that many image-token slots
per image), which the model fills in order from one packed run of the tower over every image's patches. Videos
are the same with t temporal patches of temporal_patch_size frames each, in video-token slots, from a second run
of the tower (as transformers runs it: attention stays within each temporal patch's frame). The LM's
rotary positions have three axes (models/mrope.py); the prompt's offsets (`delta`) ride in the generation cache,
so decoding continues each row from its own maximum position.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig, FusionStyle, build_connector, fusion_style
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.decoder_lm import DecoderLM, LayerCache, LMConfig, LMOutput
from mmlm.models.mrope import decode_positions, mrope_positions
from mmlm.models.qwen2_vl_vision import Qwen2VisionConfig, Qwen2VisionTransformer
from mmlm.models.vlm import VLMCache, fill_slots


@dataclass
class Qwen2VLConfig:
    """The vision tower, the patch merger (connector), the M-RoPE Qwen2 LM and the special token ids."""

    vision: Qwen2VisionConfig = field(default_factory=Qwen2VisionConfig)
    lm: LMConfig = field(default_factory=lambda: LMConfig(mrope_section=[16, 24, 24]))
    connector: ConnectorConfig = field(default_factory=lambda: ConnectorConfig(kind="patch_merger"))
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    # Qwen2.5-VL: M-RoPE time steps per second of video (temporal patch k sits at k·this·seconds per patch);
    # None: Qwen2-VL, temporal patch k at k
    tokens_per_second: float | None = None
    audio: None = None  # what GenerativeModel asks every VLM: no audio tower, one frame per image slot
    audio_token_id: None = None
    video_pool: int = 1
    version: int = CONFIG_VERSION


@dataclass
class MRopeState:
    """Each row's M-RoPE offset [B] and, until the prompt has run, its positions [3, B, T]."""

    deltas: torch.Tensor
    prompt_positions: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (generation drops finished ones)."""
        self.deltas = self.deltas[rows]
        if self.prompt_positions is not None:
            self.prompt_positions = self.prompt_positions[:, rows]

    def cat(self, other: "MRopeState") -> "MRopeState":
        """Return the state of this batch's rows followed by `other`'s (serving merges running batches). Only
        offsets carry over: decode positions count each row's real tokens (its mask), so left padding added by
        the merge does not move them."""
        return MRopeState(torch.cat([self.deltas, other.deltas]))


class Qwen2VLModel(nn.Module):
    """Vision tower + patch merger + M-RoPE decoder LM; `forward` takes ids with image slots, packed patches and
    each image's grid."""

    def __init__(self, cfg: Qwen2VLConfig) -> None:
        super().__init__()
        if cfg.lm.mrope_section is None:
            raise InputError("lm.mrope_section: Qwen2-VL's LM needs M-RoPE sections, e.g. [16, 24, 24]")
        self.cfg = cfg
        self.vision = Qwen2VisionTransformer(cfg.vision)
        self.connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
        self.lm = DecoderLM(cfg.lm)

    @property
    def style(self) -> FusionStyle:
        """Return the fusion style (the patch merger's)."""
        return fusion_style(self.cfg.connector.kind)

    @property
    def image_tokens(self) -> int:
        """Return 0: an image's LM tokens depend on its size (Qwen2VLImageProcessor.num_image_tokens)."""
        return 0

    @property
    def audio_tokens(self) -> int:
        """Return 0: no audio tower."""
        return 0

    def image_features(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """Return the images' LM tokens, packed patches [N, C·t·p·p] with grids [I, 3] -> [N/m², D_lm]."""
        states = self.vision(pixel_values, image_grid)  # [N, Dv]
        return self.connector(states[None])[0]

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                video_values: torch.Tensor | None = None, video_grid: torch.Tensor | None = None,
                second_per_grid: torch.Tensor | None = None) -> tuple[torch.Tensor, MRopeState]:  # fmt: skip
        """Return the LM's input embeddings [B, T, D] with the images and videos in their slots, and the prompt's
        M-RoPE state (positions and offsets). Videos: packed patches [N, C·t·p·p], grids [V, 3] and seconds per
        temporal patch [V] (Qwen2.5-VL's time axis; None: transformers' default of 1 s)."""
        cfg = self.cfg
        is_image, is_video = input_ids == cfg.image_token_id, input_ids == cfg.video_token_id
        embeds = self.lm.embed(input_ids.masked_fill(is_image | is_video, 0))
        for values, grid, slots, item in ((pixel_values, image_grid, is_image, "image"),
                                          (video_values, video_grid, is_video, "video")):  # fmt: skip
            if values is not None or bool(slots.any()):
                if values is None or grid is None:
                    raise InputError(f"{int(slots.sum())} {item}-token slots but no {item}s")
                tokens = self.image_features(values, grid)
                embeds = fill_slots(embeds, slots, tokens[None], item, "visual")
        intervals = None
        if video_grid is not None:
            intervals = (
                torch.ones(len(video_grid)) if second_per_grid is None else second_per_grid.float().cpu()
            )
            # transformers: tokens_per_second · seconds in float32 (Qwen2-VL: a step of 1 per temporal patch)
            intervals = intervals * cfg.tokens_per_second if cfg.tokens_per_second is not None else None
        positions, deltas = mrope_positions(
            input_ids, image_grid, cfg.image_token_id, cfg.vision.merge_size, attention_mask,
            video_grid, cfg.video_token_id, intervals,
        )  # fmt: skip
        return embeds, MRopeState(deltas, positions)

    def new_cache(self, batch: int, length: int | None = None, media: Any = None) -> VLMCache:
        """Return an empty generation cache for `batch` rows (`length` positions: static) carrying `media`, the
        prompt's MRopeState (what `prepare` returned)."""
        return VLMCache(self.lm.new_cache(batch, length), media)

    def run_lm(self, embeds: torch.Tensor, media: MRopeState | None = None,
               attention_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
               last_only: bool = False) -> LMOutput:  # fmt: skip
        """Return the LM's output for embeddings [B, T, D]: the prompt at its M-RoPE positions, later tokens after
        each row's offset (media None: plain text positions)."""
        past = cache[0].length if cache else 0
        positions = None
        if media is not None:
            prompt = media.prompt_positions
            if past == 0 and prompt is not None and prompt.shape[-1] == embeds.shape[1]:
                positions = prompt.to(embeds.device)
            else:
                positions = decode_positions(media.deltas, attention_mask, past, embeds.shape[1])
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                       cache=cache, last_only=last_only)  # fmt: skip

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None, last_only: bool = False,
                video_values: torch.Tensor | None = None, video_grid: torch.Tensor | None = None,
                second_per_grid: torch.Tensor | None = None) -> LMOutput:  # fmt: skip
        """Return LM logits [B, T, vocab] for ids [B, T] whose image slots are filled from packed patches
        `pixel_values` [N, C·t·p·p] of images with grids `image_grid` [I, 3], and whose video slots from
        `video_values` of videos with grids `video_grid` [V, 3] (`second_per_grid` [V]: see `prepare`)."""
        embeds, state = self.prepare(input_ids, pixel_values, image_grid, attention_mask, video_values, video_grid,
                                     second_per_grid)  # fmt: skip
        return self.run_lm(embeds, state, attention_mask, cache, last_only)
