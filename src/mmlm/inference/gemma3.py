"""A loaded Gemma 3 image-text model (or its text-only LM, Gemma3ForCausalLM, as a CausalLM): GenerativeModel's generate, stream and chat over Gemma3Model, and reading
and writing transformers Gemma3ForConditionalGeneration folders.

The processor is VLMProcessor with Gemma's steps plugged in: `<start_of_image>` is the placeholder (the chat
template writes one per image part), the image processor resizes each image to the tower's square size (as
SigLIP's), and the prompt expansion wraps image_seq_length `<image_soft_token>` slots in the image markers.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_gemma3 import (
    gemma3_config_from_hf,
    gemma3_config_to_hf,
    gemma3_key_map,
    gemma3_lm_config_from_hf,
    gemma3_lm_key_map,
)
from mmlm.checkpoints.hf_llama import drop_derived
from mmlm.checkpoints.hf_llava import llava_layout
from mmlm.checkpoints.keymap import to_theirs
from mmlm.checkpoints.mmlm_format import write_json
from mmlm.checkpoints.processor_files import image_processor_settings, processor_settings
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.base import check_request
from mmlm.inference.causal_lm import CausalLM, build_cast_per_tensor, generation_eos_ids, lm_tokenizer
from mmlm.inference.generation import vlm_step
from mmlm.inference.vlm import GenerativeModel
from mmlm.models.gemma3 import Gemma3Model
from mmlm.processing.chat import ChatTemplate
from mmlm.processing.gemma3_prompt import BOI_TOKEN, Gemma3Prompt
from mmlm.processing.image import ImageProcessor
from mmlm.processing.vlm_processor import VLMProcessor

HF_TYPES = ("Gemma3ImageProcessor",)
PAN_AND_SCAN = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                "pan_and_scan_min_ratio_to_activate")  # fmt: skip


class Gemma3GenerativeModel(GenerativeModel):
    """A Gemma 3 image-text model ready for use: `generate`, `stream`, `chat`, `save_pretrained` (transformers)."""

    architecture = "gemma3"

    def __init__(self, model: Gemma3Model, processor: VLMProcessor, eos_token_ids: Sequence[int] | None = None,
                 source_format: str | None = None) -> None:  # fmt: skip
        # the placeholder (<start_of_image>) is not the slot token (<image_soft_token>) the model fills
        if processor.image_token_id != model.cfg.boi_token_id:
            raise InputError(
                f"the tokenizer's {BOI_TOKEN} has id {processor.image_token_id}, the model expects "
                f"{model.cfg.boi_token_id} (boi_token_index)"
            )
        slot = processor.tokenizer.token_to_id(processor.image_prompt.slot_token)
        if slot != model.cfg.image_token_id:
            raise InputError(
                f"the tokenizer's {processor.image_prompt.slot_token} has id {slot}, the model expects "
                f"{model.cfg.image_token_id} (image_token_index)"
            )
        self._hold(model, processor, eos_token_ids, source_format)

    def prepare(self, prompts, images, settings, cache: str, audio=None, sampling_rate=None, videos=None,
                num_frames: int = 8, video_fps: float | None = None):  # fmt: skip
        """Return (step, cache, settings cut to the context, prompt embeddings, mask or None) for a batch of prompts."""
        check_request(settings, cache)
        self._only_images("Gemma 3", audio, videos)
        batch = self.processor(prompts, images, add_generation_prompt=True, padding_side="left")
        ids, mask, settings = self._fit_context(batch, settings)
        pixels = batch["pixel_values"]
        with torch.inference_mode():
            embeds, blocks = self.model.prepare(
                ids, None if pixels is None else pixels.to(self.device, self.dtype)
            )
        length = ids.shape[1] + settings.max_new_tokens if cache == "static" else None
        kv = self.model.new_cache(ids.shape[0], length, blocks)  # the prompt's image numbering rides in it
        return vlm_step(self.model), kv, settings, embeds, (None if bool(mask.all()) else mask)

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layout = llava_layout(
            {"model.language_model.x"}
        )  # transformers 5's layout, as save_pretrained writes
        return gemma3_config_to_hf(self.config), to_theirs(weights, gemma3_key_map(self.config, layout))

    def save_pretrained(self, folder: str | Path, format: str = "auto") -> Path:
        """Write a transformers folder (Gemma 3 has no mmlm format of its own); return the folder."""
        if format == "mmlm":
            raise InputError("format: Gemma 3 saves as a transformers folder only; use format='auto'")
        return super().save_pretrained(folder, format)

    def _save_files(self, folder: Path) -> None:
        processor = self.processor
        processor.tokenizer.save(str(folder / "tokenizer.json"))
        prompt = processor.image_prompt
        tokenizer_config = {**processor.special_tokens, "model_max_length": self.config.lm.max_positions,
                            "chat_template": processor.chat_template.source, "boi_token": prompt.boi_token,
                            "eoi_token": prompt.eoi_token, "image_token": prompt.slot_token}  # fmt: skip
        write_json(folder / "tokenizer_config.json", tokenizer_config)
        settings = {**processor.image_processor.to_hf(), "image_processor_type": "Gemma3ImageProcessor"}
        write_json(folder / "preprocessor_config.json", settings)
        write_json(folder / "processor_config.json", {"image_seq_length": prompt.image_seq_length,
                                                      "processor_class": "Gemma3Processor"})  # fmt: skip
        generation = {"bos_token_id": self.config.lm.bos_token_id, "eos_token_id": self.eos_token_ids,
                      "pad_token_id": self.config.lm.pad_token_id}  # fmt: skip
        write_json(folder / "generation_config.json", generation)


def gemma3_image_processor(folder: Path, settings: dict[str, Any]) -> ImageProcessor:
    """Return Gemma3ImageProcessor's steps (a SigLIP-style square resize); InputError where pan-and-scan is on."""
    kind = str(settings.get("image_processor_type", "")).removesuffix("Pil").removesuffix("Fast")
    if kind not in HF_TYPES:
        raise InputError(f"{folder}: image_processor_type {kind!r}; expected one of {list(HF_TYPES)}")
    if settings.get("do_pan_and_scan"):
        raise InputError(f"{folder}: do_pan_and_scan is true; mmlm reads Gemma 3 images as one view each")
    plain = {k: v for k, v in settings.items() if k not in PAN_AND_SCAN and k != "processor_class"}
    return ImageProcessor.from_hf({**plain, "image_processor_type": "SiglipImageProcessor"})


def gemma3_processor(folder: Path, model: Gemma3Model) -> VLMProcessor:
    """Return the folder's processor: a square resize and the `<start_of_image>` expansion."""
    image_processor = gemma3_image_processor(folder, image_processor_settings(folder))
    side = model.cfg.vision.image_size
    if image_processor.size != (side, side):
        raise InputError(
            f"{folder}: the image processor resizes to {image_processor.size}, the tower reads {side}x{side} px"
        )
    seq_len = processor_settings(folder).get("image_seq_length", model.image_tokens)
    if seq_len != model.image_tokens:
        raise InputError(
            f"{folder}: image_seq_length {seq_len} in processor_config.json, but the model makes "
            f"{model.image_tokens} tokens per image (mm_tokens_per_image)"
        )
    return VLMProcessor.from_pretrained(
        folder, image_processor, model.image_tokens, image_token=BOI_TOKEN,
        image_prompt=Gemma3Prompt(model.image_tokens), max_length=model.cfg.lm.max_positions,
    )  # fmt: skip


def load_gemma3(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Gemma3GenerativeModel:
    """Return a transformers Gemma3ForConditionalGeneration folder as a generative model."""
    try:
        cfg = gemma3_config_from_hf(cfg_json)
    except InputError as error:
        raise InputError(f"{folder / 'config.json'}: {error}") from None
    weights = read_weights(folder, dtype)
    layout = llava_layout(set(weights))
    if cfg.lm.tie_word_embeddings:
        weights.pop(f"{layout.head}.weight", None)
    model = build_from_weights(lambda: Gemma3Model(cfg), weights, gemma3_key_map(cfg, layout), str(folder),
                               device, dtype)  # fmt: skip
    weights.clear()
    if device.type == "cpu":
        model.lm.prepare_for_inference()
    return Gemma3GenerativeModel(model, gemma3_processor(folder, model), generation_eos_ids(folder), "gemma3")


def load_gemma3_text(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Return a transformers Gemma3ForCausalLM folder (model_type gemma3_text) as a CausalLM; it saves in mmlm's
    format, since the Llama-family export does not hold Gemma's options."""
    try:
        cfg = gemma3_lm_config_from_hf(cfg_json)
    except InputError as error:
        raise InputError(f"{folder / 'config.json'}: {error}") from None
    weights = drop_derived(read_weights(folder), cfg)
    model = build_cast_per_tensor(cfg, weights, gemma3_lm_key_map(cfg), str(folder), device, dtype)
    return CausalLM(model, lm_tokenizer(folder, cfg), "gemma3_text", generation_eos_ids(folder),
                    ChatTemplate.from_pretrained(folder))  # fmt: skip
