"""A loaded Chameleon: GenerativeModel's generate, stream and chat over ChameleonModel, and reading and writing
transformers ChameleonForConditionalGeneration folders.

The processor is VLMProcessor with Chameleon's steps plugged in: ChameleonImageProcessor's resize and crop, each
`<image>` expanded to `<racm3:break>` + image_seq_length `<image>` + `<eoss>` (processing/chameleon_prompt.py),
and the tokenizer's separator appended to every prompt, as ChameleonProcessor does in chat mode. `prepare` splices
the images' code tokens into the ids and hands the decode loop their embeddings, so generation, the server and
`mmlm eval vlm` run Chameleon through the same step as any VLM (ChameleonModel.run_lm).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_chameleon import chameleon_config_from_hf, chameleon_config_to_hf, chameleon_key_map
from mmlm.checkpoints.keymap import to_theirs
from mmlm.checkpoints.mmlm_format import write_json
from mmlm.checkpoints.processor_files import image_processor_settings, processor_settings
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.base import check_request
from mmlm.inference.causal_lm import generation_eos_ids
from mmlm.inference.generation import vlm_step
from mmlm.inference.vlm import GenerativeModel
from mmlm.json_files import read_json_object
from mmlm.models.chameleon import ChameleonModel
from mmlm.processing.chameleon_prompt import ChameleonPrompt
from mmlm.processing.image import ImageProcessor
from mmlm.processing.vlm_processor import VLMProcessor

IMAGE_TOKEN = "<image>"


class ChameleonGenerativeModel(GenerativeModel):
    """A Chameleon ready for use: `generate`, `stream`, `chat`, `save_pretrained` (transformers)."""

    architecture = "chameleon"

    def __init__(self, model: ChameleonModel, processor: VLMProcessor, eos_token_ids: Sequence[int] | None = None,
                 source_format: str | None = None) -> None:  # fmt: skip
        if processor.image_token_id != model.cfg.image_token_id:
            raise InputError(
                f"the tokenizer's {IMAGE_TOKEN} has id {processor.image_token_id}, config.json's vocabulary_map "
                f"says {model.cfg.image_token_id}"
            )
        if processor.tokens_per_tile != model.cfg.image_tokens:
            raise InputError(
                f"the processor reserves {processor.tokens_per_tile} tokens per image, the VQ-GAN makes "
                f"{model.cfg.image_tokens}"
            )
        self._hold(model, processor, eos_token_ids, source_format)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of token ids, special tokens skipped."""
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prepare(self, prompts, images, settings, cache: str, audio=None, sampling_rate=None, videos=None,
                num_frames: int = 8, video_fps: float | None = None):  # fmt: skip
        """Return (step, cache, settings cut to the context, prompt embeddings, mask or None) for a batch of prompts."""
        check_request(settings, cache)
        self._only_images("Chameleon", audio, videos)
        batch = self.processor(prompts, images, add_generation_prompt=True, padding_side="left")
        ids, mask, settings = self._fit_context(batch, settings)
        pixels = batch["pixel_values"]
        with torch.inference_mode():
            spliced = self.model.splice(ids, None if pixels is None else pixels.to(self.device, self.dtype))
            embeds = self.model.lm.embed(spliced)
        length = ids.shape[1] + settings.max_new_tokens if cache == "static" else None
        kv = self.model.new_cache(ids.shape[0], length)
        return vlm_step(self.model), kv, settings, embeds, (None if bool(mask.all()) else mask)

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        vocabulary = self.processor.tokenizer.get_vocab(with_added_tokens=True)
        return chameleon_config_to_hf(self.config, vocabulary), to_theirs(
            weights, chameleon_key_map(self.config)
        )

    def save_pretrained(self, folder: str | Path, format: str = "auto") -> Path:
        """Write a transformers folder (Chameleon has no mmlm format of its own); return the folder."""
        if format == "mmlm":
            raise InputError("format: Chameleon saves as a transformers folder only; use format='auto'")
        return super().save_pretrained(folder, format)

    def _save_files(self, folder: Path) -> None:
        processor = self.processor
        processor.tokenizer.save(str(folder / "tokenizer.json"))
        separator = {"sep_token": processor.prompt_suffix} if processor.prompt_suffix else {}
        tokenizer_config = {
            **processor.special_tokens,
            **separator,
            "model_max_length": self.config.lm.max_positions,
        }
        write_json(folder / "tokenizer_config.json", tokenizer_config)
        write_json(folder / "processor_config.json", {
            "processor_class": "ChameleonProcessor", "image_seq_length": processor.tokens_per_tile,
            "image_token": processor.image_token, "image_processor": processor.image_processor.to_hf(),
        })  # fmt: skip
        # transformers' processors read their template from this file only, not tokenizer_config.json
        (folder / "chat_template.jinja").write_text(processor.chat_template.source, encoding="utf-8")
        generation = {"bos_token_id": self.config.lm.bos_token_id, "eos_token_id": self.eos_token_ids,
                      "pad_token_id": self.config.lm.pad_token_id}  # fmt: skip
        write_json(folder / "generation_config.json", generation)


def separator_token(folder: Path) -> str:
    """Return tokenizer_config.json's sep_token (Chameleon's `<reserved08706>`), or "" without one."""
    path = folder / "tokenizer_config.json"
    value = read_json_object(path).get("sep_token") if path.is_file() else None
    if isinstance(value, dict):  # older saves write {"content": ..., "__type": "AddedToken"}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def chameleon_processor(folder: Path, model: ChameleonModel) -> VLMProcessor:
    """Return the folder's processor: ChameleonImageProcessor's pixels, the image expansion and the separator."""
    settings = image_processor_settings(folder)
    image_processor = ImageProcessor.from_hf(settings)
    path = folder / "processor_config.json"
    seq_length = processor_settings(folder).get("image_seq_length", model.cfg.image_tokens)
    if seq_length != model.cfg.image_tokens:
        raise InputError(
            f"{path}: image_seq_length {seq_length}, but the VQ-GAN makes {model.cfg.image_tokens} codes per image"
        )
    side = model.cfg.vq.resolution
    if image_processor.crop_size != (side, side):
        raise InputError(
            f"{folder}: the image processor crops to {image_processor.crop_size}, but the VQ-GAN reads "
            f"{side}×{side} images"
        )
    return VLMProcessor.from_pretrained(
        folder, image_processor, seq_length, image_token=IMAGE_TOKEN, image_prompt=ChameleonPrompt(seq_length),
        max_length=model.cfg.lm.max_positions, prompt_suffix=separator_token(folder),
    )  # fmt: skip


def load_chameleon(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ChameleonGenerativeModel:
    """Return a transformers ChameleonForConditionalGeneration folder as a generative model."""
    try:
        cfg = chameleon_config_from_hf(cfg_json)
    except InputError as error:
        raise InputError(f"{folder / 'config.json'}: {error}") from None
    weights = read_weights(folder, dtype)
    if cfg.lm.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = build_from_weights(lambda: ChameleonModel(cfg), weights, chameleon_key_map(cfg), str(folder),
                               device, dtype)  # fmt: skip
    weights.clear()
    if device.type == "cpu":
        model.lm.prepare_for_inference()
    model.eval()
    processor = chameleon_processor(folder, model)
    return ChameleonGenerativeModel(model, processor, generation_eos_ids(folder), cfg_json.get("model_type"))
