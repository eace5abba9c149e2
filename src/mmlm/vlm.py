"""The LLaVA-style vision-language model: ViT -> connector -> decoder LM, with image tokens in the text sequence.

Early fusion (LLaVA, Liu et al. 2023): the processor writes one `image_token_id` per visual token where each
`<image>` was; the model embeds the text, then scatters the connector's outputs into those slots in order
(image by image, tile by tile, token by token), and the LM reads one mixed sequence. No per-sample Python loop.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import CONFIG_VERSION, VisionConfig
from mmlm.connectors import ConnectorConfig, build_connector
from mmlm.encoders.vision import VisionTransformer
from mmlm.errors import InputError
from mmlm.lm import DecoderLM, LayerCache, LMConfig, LMOutput


@dataclass
class VLMConfig:
    """A vision tower, a connector and a decoder LM, plus how image features are read and where they go."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(embed_dim=None))
    lm: LMConfig = field(default_factory=LMConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    image_token_id: int = 32000
    feature_layers: list[int] = field(default_factory=lambda: [-2])  # transformers' vision_feature_layer
    feature_select: str = "default"  # default: drop the first token (CLIP's class token) | full: keep all
    version: int = CONFIG_VERSION

    @property
    def patches(self) -> int:
        """Return the vision tokens per image that reach the connector."""
        tokens = self.vision.grid**2 + int(self.vision.class_token)
        return tokens - 1 if self.feature_select == "default" else tokens


class VisionLanguageModel(nn.Module):
    """ViT + connector + decoder LM; `forward` takes token ids with image slots and the images' pixels."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        if cfg.feature_select not in ("default", "full"):
            raise InputError(f"feature_select: expected 'default' or 'full', got {cfg.feature_select!r}")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        vision_dim = cfg.vision.width * len(cfg.feature_layers)  # several layers are concatenated
        self.connector = build_connector(cfg.connector, vision_dim, cfg.lm.width)
        self.lm = DecoderLM(cfg.lm)

    @property
    def image_tokens(self) -> int:
        """Return the LM tokens one image (or tile) becomes."""
        return self.connector.num_tokens(self.cfg.patches)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [I, 3, H, W] -> [I, image_tokens, D_lm]."""
        states = self.vision.layer_features(pixel_values, self.cfg.feature_layers)
        if self.cfg.feature_select == "default":
            states = [s[:, 1:] for s in states]  # as transformers: drops the class token (any first token)
        return self.connector(torch.cat(states, dim=-1))  # [I, N, Dv·layers] -> [I, N', D_lm]

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Return the LM's input embeddings [B, T, D] with image features in the image-token slots."""
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.lm.embed(input_ids.masked_fill(is_image, 0))
        slots = int(is_image.sum())
        if pixel_values is None or slots == 0:
            if slots or pixel_values is not None:
                raise InputError(
                    f"{slots} image-token slots but {0 if pixel_values is None else len(pixel_values)} images"
                )
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)
        if features.shape[0] * features.shape[1] != slots:
            raise InputError(
                f"the text holds {slots} image-token slots but {features.shape[0]} images give "
                f"{features.shape[0] * features.shape[1]} visual tokens ({features.shape[1]} each)"
            )
        return embeds.masked_scatter(is_image[..., None], features)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        last_only: bool = False,
    ) -> LMOutput:
        """Return LM logits [B, T, vocab] for ids [B, T] whose image slots are filled from `pixel_values`."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, last_only=last_only)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Return next-token cross-entropy: logits at t predict labels at t+1; labels of −100 are ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )
