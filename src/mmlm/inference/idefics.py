"""A loaded Idefics (v1): GenerativeModel over VisionLanguageModel with cross_attention fusion, read from and
written to transformers IdeficsForVisionText2Text folders.

The config has no `<image>` id, so it comes from the tokenizer, as IdeficsProcessor takes it; so does the
end-of-document token (the tokenizer's eos) after which text sees no image. Prompts are written as
IdeficsProcessor writes them (mmlm.processing.idefics_prompt); images are squashed to the tower's square and
normalised (IdeficsImageProcessor: mmlm's ImageProcessor reads its settings).
"""

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_idefics import (
    idefics_config_to_hf,
    idefics_key_map,
    idefics_representable,
    vlm_config_from_idefics,
)
from mmlm.checkpoints.keymap import to_theirs
from mmlm.checkpoints.mmlm_format import write_json
from mmlm.checkpoints.processor_files import image_processor_settings
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.causal_lm import generation_eos_ids
from mmlm.inference.vlm import GenerativeModel
from mmlm.models.vlm import VisionLanguageModel
from mmlm.processing.chat import special_tokens_of
from mmlm.processing.idefics_prompt import FAKE_TOKEN, IdeficsProcessor
from mmlm.processing.image import ImageProcessor

IMAGE_TOKEN = "<image>"


class IdeficsGenerativeModel(GenerativeModel):
    """An Idefics (v1) ready for use; `save_pretrained` writes a transformers IdeficsForVisionText2Text folder."""

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The transformers Idefics folder, its added tokens (from `<fake_token_around_image>` on) decoupled."""
        if not idefics_representable(self.config):
            return None
        first = self.processor.tokenizer.token_to_id(FAKE_TOKEN)
        extra = self.config.lm.vocab_size - first if first is not None else 0
        return idefics_config_to_hf(self.config, extra), to_theirs(
            weights, idefics_key_map(self.config, extra)
        )

    def _save_files(self, folder: Path) -> None:
        super()._save_files(folder)
        settings = self.processor.image_processor.to_hf()
        side = self.config.vision.image_size
        settings.update(image_processor_type="IdeficsImageProcessor", image_size=side, image_num_channels=3)
        write_json(folder / "preprocessor_config.json", settings)


def idefics_image_processor(settings: dict[str, Any]) -> ImageProcessor:
    """Return IdeficsImageProcessor's steps from its settings: squash to the square `image_size` (it overrides
    `size`, as in transformers), bicubic, rescale, normalise with CLIP's mean and std."""
    size = settings.get("size") or {"height": 224, "width": 224}
    if "image_size" in settings:
        size = {"height": settings["image_size"], "width": settings["image_size"]}
    clip = ImageProcessor.clip(224)
    return ImageProcessor(
        "exact", (int(size["height"]), int(size["width"])), None,
        mean=settings.get("image_mean", clip.mean), std=settings.get("image_std", clip.std),
        rescale_factor=float(settings.get("rescale_factor", 1 / 255)), do_resize=bool(settings.get("do_resize", True)),
        do_rescale=bool(settings.get("do_rescale", True)), do_normalize=bool(settings.get("do_normalize", True)),
        resample=int(settings.get("resample", 3)), hf_type="IdeficsImageProcessor",
    )  # fmt: skip


def _token_id(tokenizer: Tokenizer, token: str | None, folder: Path) -> int | None:
    if token is None:
        return None
    found = tokenizer.token_to_id(token)
    if found is None:
        raise InputError(f"{folder / 'tokenizer.json'}: no {token} token, which Idefics prompts need")
    return found


def load_idefics(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> IdeficsGenerativeModel:
    """Return a transformers IdeficsForVisionText2Text folder as a GenerativeModel."""
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as error:  # tokenizers raises a bare Exception on a missing or bad file
        raise InputError(f"{folder / 'tokenizer.json'}: expected a tokenizers JSON file ({error})") from None
    image = _token_id(tokenizer, IMAGE_TOKEN, folder)
    _token_id(tokenizer, FAKE_TOKEN, folder)
    eos = _token_id(tokenizer, special_tokens_of(folder).get("eos_token"), folder)
    try:
        cfg = vlm_config_from_idefics(cfg_json, image_token_id=image, end_of_document_id=eos)
    except InputError as error:
        raise InputError(f"{folder / 'config.json'}: {error}") from None
    extra = int(cfg_json.get("additional_vocab_size", 0))
    weights = read_weights(folder, dtype)  # cast as read: a bf16 load never holds fp32 weights
    if cfg.lm.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        weights.pop("lm_head.additional_fc.weight", None)
    rules = idefics_key_map(cfg, extra)
    model = build_from_weights(lambda: VisionLanguageModel(cfg), weights, rules, str(folder), device, dtype)
    weights.clear()
    if device.type == "cpu":
        model.lm.prepare_for_inference()  # the decode layout: same values, faster CPU matrix-vector products
    image_processor = idefics_image_processor(image_processor_settings(folder))
    processor = IdeficsProcessor.from_pretrained(
        folder, image_processor, model.image_tokens, max_length=cfg.lm.max_positions
    )
    return IdeficsGenerativeModel(model, processor, generation_eos_ids(folder), "idefics")
