"""Gemma 3 image-text (Gemma Team 2025): SigLIP tower -> pooled projector -> Gemma 3 LM.

Each image is one view at the tower's size; its last hidden states (after the tower's final LayerNorm) are
average-pooled to mm_tokens_per_image tokens (fusion/pooled_projector.py) that fill the image's slots in the
prompt, `<start_of_image>` + mm_tokens_per_image × `<image_soft_token>` + `<end_of_image>`. The LM is
DecoderLM with Gemma's options (models/decoder_lm.py). While the prompt runs, the slots of one image attend to
each other both ways; text stays causal. The image numbering rides in the generation cache, so the prompt
step can read it and later steps need nothing.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig, FusionStyle, build_connector, fusion_style
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.decoder_lm import DecoderLM, LayerCache, LMConfig, LMOutput
from mmlm.models.vision import VisionConfig, VisionTransformer
from mmlm.models.vlm import VLMCache, fill_slots


@dataclass
class Gemma3Config:
    """The SigLIP tower, the pooled projector (connector), the Gemma 3 LM and the image's special token ids."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(embed_dim=None))
    lm: LMConfig = field(default_factory=LMConfig)
    connector: ConnectorConfig = field(
        default_factory=lambda: ConnectorConfig(kind="pooled", scale_factor=4, norm="rms_offset", bias=False)
    )
    image_token_id: int = 262144  # <image_soft_token>: the slots the projector fills
    boi_token_id: int = 255999  # <start_of_image>: the placeholder a prompt writes for each image
    eoi_token_id: int = 256000  # <end_of_image>
    audio: None = None  # what GenerativeModel asks every VLM: no audio tower, one frame per image slot
    audio_token_id: None = None
    video_pool: int = 1
    version: int = CONFIG_VERSION


def image_blocks(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Return each slot's image number within its row, [B, T] -> [B, T], -1 for text: a run of consecutive
    image tokens is one image (transformers' get_block_sequence_ids_for_mask)."""
    is_image = input_ids == image_token_id
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)


@dataclass
class ImageBlocks:
    """The prompt's image numbering [B, T] until the prompt has run (then None: decoded tokens are text)."""

    blocks: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (generation drops finished ones)."""
        if self.blocks is not None:
            self.blocks = self.blocks[rows]


class Gemma3Model(nn.Module):
    """SigLIP tower + pooled projector + Gemma 3 LM; `forward` takes ids with image slots and the images' pixels."""

    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
        self.lm = DecoderLM(cfg.lm)

    @property
    def style(self) -> FusionStyle:
        """Return the fusion style (the pooled projector's)."""
        return fusion_style(self.cfg.connector.kind)

    @property
    def image_tokens(self) -> int:
        """Return the LM tokens one image becomes (mm_tokens_per_image)."""
        return self.connector.num_tokens(self.cfg.vision.grid**2)

    @property
    def audio_tokens(self) -> int:
        """Return 0: no audio tower."""
        return 0

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [I, 3, H, W] -> [I, image_tokens, D_lm]."""
        states = self.vision.layer_features(pixel_values, [-1])[0]
        return self.connector(self.vision.norm_post(states))  # SigLIP's last_hidden_state is post-LayerNorm

    def prepare(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ImageBlocks]:
        """Return the LM's input embeddings [B, T, D] with the images in their slots, and the prompt's image
        numbering for the bidirectional attention among each image's slots."""
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.lm.embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is not None or bool(is_image.any()):
            if pixel_values is None:
                raise InputError(f"{int(is_image.sum())} image-token slots but no images")
            embeds = fill_slots(embeds, is_image, self.image_features(pixel_values), "image", "visual")
        return embeds, ImageBlocks(
            image_blocks(input_ids, self.cfg.image_token_id) if bool(is_image.any()) else None
        )

    def new_cache(self, batch: int, length: int | None = None, media: Any = None) -> VLMCache:
        """Return an empty generation cache for `batch` rows (`length` positions: static) carrying `media`, the
        prompt's ImageBlocks (what `prepare` returned)."""
        return VLMCache(self.lm.new_cache(batch, length), media)

    def run_lm(self, embeds: torch.Tensor, media: ImageBlocks | None = None,
               attention_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
               last_only: bool = False) -> LMOutput:  # fmt: skip
        """Return the LM's output for embeddings [B, T, D]; the prompt's images attend both ways within each."""
        blocks = None
        if media is not None and media.blocks is not None and media.blocks.shape[1] == embeds.shape[1]:
            blocks = media.blocks.to(embeds.device)
            media.blocks = None  # read once: the prompt step; decoded tokens are text
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, last_only=last_only,
                       image_blocks=blocks)  # fmt: skip

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                last_only: bool = False) -> LMOutput:  # fmt: skip
        """Return LM logits [B, T, vocab] for ids [B, T] whose image slots are filled from `pixel_values`."""
        embeds, blocks = self.prepare(input_ids, pixel_values)
        return self.run_lm(embeds, blocks, attention_mask, cache, last_only)
