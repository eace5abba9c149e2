"""Chameleon (Chameleon Team 2024): images as ordinary tokens of one vocabulary, read by one decoder LM.

A VQ-GAN (models/vq_image_tokenizer.py) turns an image into a grid of codes; each code k is the vocabulary
entry `code_token_ids[k]` (the tokenizer's "IMGIMG…" tokens, transformers' img2bpe). The prompt holds one
`<image>` placeholder per code, between the begin- and end-of-image tokens; the model overwrites the placeholders
with the image's code tokens and runs the LM on ids alone: no connector, no image embeddings of their own.
The LM is Llama's, with a LayerNorm per head on queries and keys (and, for the 30B model, swin_norm).
Chameleon never writes image tokens when asked for text: their logits are set to the dtype's minimum.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.style import FusionStyle
from mmlm.models.config import CONFIG_VERSION
from mmlm.models.decoder_lm import DecoderLM, LayerCache, LMConfig, LMOutput
from mmlm.models.vq_image_tokenizer import VQImageTokenizer, VQTokenizerConfig


@dataclass
class ChameleonConfig:
    """The VQ-GAN, the LM, the `<image>` placeholder id and the vocabulary id of each VQ code."""

    vq: VQTokenizerConfig = field(default_factory=VQTokenizerConfig)
    lm: LMConfig = field(
        default_factory=lambda: LMConfig(vocab_size=65536, qk_norm="layer_per_head", norm_eps=1e-5)
    )
    image_token_id: int = 8711
    code_token_ids: tuple[int, ...] = ()  # [num_embeddings]: vocabulary id of VQ code k
    version: int = CONFIG_VERSION

    @property
    def image_tokens(self) -> int:
        """Return the number of code tokens one image becomes."""
        return self.vq.tokens_per_image()


class ChameleonModel(nn.Module):
    """VQ-GAN image tokenizer + decoder LM; `forward` takes ids with `<image>` placeholders and their images."""

    # what generation and the server ask a VLM's style: Chameleon keeps no per-prompt state, so rows may join a
    # running batch, and every decoded id is the vocabulary's own
    style = FusionStyle()

    def __init__(self, cfg: ChameleonConfig) -> None:
        super().__init__()
        if len(cfg.code_token_ids) != cfg.vq.num_embeddings:
            raise InputError(
                f"vocabulary_map: {len(cfg.code_token_ids)} image tokens for a codebook of {cfg.vq.num_embeddings}"
            )
        self.cfg = cfg
        self.vqmodel = VQImageTokenizer(cfg.vq)
        self.lm = DecoderLM(cfg.lm)

    def image_token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return each image's code tokens as vocabulary ids, [N, 3, H, W] -> [N, h·w] (transformers' get_image_tokens)."""
        codes = self.vqmodel(pixel_values)
        return torch.tensor(self.cfg.code_token_ids, device=codes.device)[codes]

    def splice(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Return ids [B, T] with the `<image>` placeholders overwritten, in order, by the images' code tokens."""
        slots = input_ids == self.cfg.image_token_id
        count = int(slots.sum())
        if pixel_values is None:
            if count:
                raise InputError(f"input_ids: {count} <image> placeholders but no images")
            return input_ids
        tokens = self.image_token_ids(pixel_values).flatten()
        if count != tokens.numel():
            raise InputError(
                f"input_ids: {count} <image> placeholders for {pixel_values.shape[0]} images of "
                f"{tokens.numel() // max(pixel_values.shape[0], 1)} tokens each"
            )
        return input_ids.masked_scatter(slots, tokens)

    def suppress_image_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Return logits with every image code token at the dtype's minimum, so text generation never picks one."""
        index = torch.tensor(self.cfg.code_token_ids, device=logits.device)
        return logits.index_fill(-1, index, torch.finfo(logits.dtype).min)

    def new_cache(self, batch: int, max_length: int | None = None, *_: object) -> list[LayerCache]:
        """Return the LM's empty per-layer caches (preallocated for `max_length` positions if given)."""
        return self.lm.new_cache(batch, max_length)

    def run_lm(
        self,
        embeds: torch.Tensor,
        media: None = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
    ) -> LMOutput:
        """Return the LM's output (image tokens suppressed) for the embeddings [B, T, D] of spliced ids."""
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, last_only=last_only)
        return LMOutput(self.suppress_image_tokens(out.logits), out.cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
    ) -> LMOutput:
        """Return logits [B, T, vocab] (image tokens suppressed) for ids [B, T] and the images [N, 3, H, W] they hold."""
        ids = self.splice(input_ids, pixel_values)
        out = self.lm(ids, attention_mask=attention_mask, cache=cache, last_only=last_only)
        return LMOutput(self.suppress_image_tokens(out.logits), out.cache)
