"""A loaded Qwen2-VL / Qwen2.5-VL: GenerativeModel's generate, stream and chat over Qwen2VLModel, and reading and
writing transformers Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration folders.

The processor is VLMProcessor with Qwen's steps plugged in: `<|image_pad|>` is the image placeholder (the chat
template writes `<|vision_start|><|image_pad|><|vision_end|>` for each image part), the resize step gives each
image its own patch grid, and the prompt expansion repeats the placeholder once per merged token. Videos
(`{"type": "video"}` parts, `<video>` or `<|video_pad|>` in a str prompt) go through processing/qwen2_vl_video.py:
frames sampled as for mmlm's other video models, or given as a list of frames.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_qwen2_vl import (
    qwen2_vl_config_from_hf,
    qwen2_vl_config_to_hf,
    qwen2_vl_key_map,
    qwen2_vl_layout,
)
from mmlm.checkpoints.keymap import to_theirs
from mmlm.checkpoints.mmlm_format import write_json
from mmlm.checkpoints.processor_files import image_processor_settings
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.base import check_request
from mmlm.inference.causal_lm import generation_eos_ids
from mmlm.inference.generation import vlm_step
from mmlm.inference.vlm import GenerativeModel
from mmlm.json_files import read_json_object
from mmlm.models.qwen2_vl import Qwen2VLModel
from mmlm.processing.qwen2_vl_image import (
    HF_TYPES,
    qwen2_vl_processing_from_hf,
    qwen2_vl_processing_to_hf,
)
from mmlm.processing.qwen2_vl_prompt import IMAGE_PAD, Qwen2VLPrompt
from mmlm.processing.qwen2_vl_video import (
    Qwen2VLVideoProcessing,
    qwen2_vl_batch,
    qwen2_vl_video_from_hf,
    video_settings_file,
)
from mmlm.processing.vlm_processor import VLMProcessor


class Qwen2VLGenerativeModel(GenerativeModel):
    """A Qwen2-VL / Qwen2.5-VL ready for use: `generate`, `stream`, `chat`, `save_pretrained` (transformers)."""

    architecture = "qwen2_vl"

    def __init__(self, model: Qwen2VLModel, processor: VLMProcessor, eos_token_ids: Sequence[int] | None = None,
                 source_format: str | None = None,
                 video_processing: Qwen2VLVideoProcessing | None = None) -> None:  # fmt: skip
        # tokens per image vary with its size, so GenerativeModel's fixed-count check does not apply
        if processor.image_token_id != model.cfg.image_token_id:
            raise InputError(
                f"the tokenizer's {IMAGE_PAD} has id {processor.image_token_id}, the model expects "
                f"{model.cfg.image_token_id}"
            )
        self._hold(model, processor, eos_token_ids, source_format)
        # no video settings of their own: the image processor's resize and patches
        self.video_processing = video_processing or Qwen2VLVideoProcessing(
            processor.dynamic_resolution, processor.image_processor
        )

    def prepare(self, prompts, images, settings, cache: str, audio=None, sampling_rate=None, videos=None,
                num_frames: int = 8, video_fps: float | None = None):  # fmt: skip
        """Return (step, cache, settings cut to the context, prompt embeddings, mask or None) for a batch of prompts."""
        check_request(settings, cache)
        if any(any(clips) for clips in audio or ()):
            raise InputError("audio: Qwen2-VL has no audio tower")
        batch = qwen2_vl_batch(self.processor, self.video_processing, self.config.video_token_id, prompts, images,
                               videos, num_frames, video_fps)  # fmt: skip
        ids, mask, settings = self._fit_context(batch, settings)
        pixels, grids = batch["pixel_values"], image_grid_thw(batch["image_grid"])
        video = batch["video_values"]
        with torch.inference_mode():
            embeds, state = self.model.prepare(
                ids, None if pixels is None else pixels.to(self.device, self.dtype), grids, mask,
                None if video is None else video.to(self.device, self.dtype),
                None if video is None else batch["video_grid"], batch["second_per_grid"],
            )  # fmt: skip
        length = ids.shape[1] + settings.max_new_tokens if cache == "static" else None
        kv = self.model.new_cache(ids.shape[0], length, state)  # the M-RoPE offsets ride in it
        return vlm_step(self.model), kv, settings, embeds, (None if bool(mask.all()) else mask)

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return qwen2_vl_config_to_hf(self.config), to_theirs(weights, qwen2_vl_key_map(self.config))

    def save_pretrained(self, folder: str | Path, format: str = "auto") -> Path:
        """Write a transformers folder (Qwen2-VL has no mmlm format of its own); return the folder."""
        if format == "mmlm":
            raise InputError("format: Qwen2-VL saves as a transformers folder only; use format='auto'")
        return super().save_pretrained(folder, format)

    def _save_files(self, folder: Path) -> None:
        processor = self.processor
        processor.tokenizer.save(str(folder / "tokenizer.json"))
        tokenizer_config = {**processor.special_tokens, "model_max_length": self.config.lm.max_positions,
                            "chat_template": processor.chat_template.source}  # fmt: skip
        write_json(folder / "tokenizer_config.json", tokenizer_config)
        settings = qwen2_vl_processing_to_hf(processor.dynamic_resolution, processor.image_processor)
        write_json(folder / "preprocessor_config.json", settings)
        video = self.video_processing
        video_settings = qwen2_vl_processing_to_hf(video.resize, video.patches)
        video_settings["video_processor_type"] = "Qwen2VLVideoProcessor"
        del video_settings["image_processor_type"]
        write_json(video_settings_file(folder), video_settings)
        generation = {"bos_token_id": self.config.lm.bos_token_id, "eos_token_id": self.eos_token_ids,
                      "pad_token_id": self.config.lm.pad_token_id}  # fmt: skip
        write_json(folder / "generation_config.json", generation)


def image_grid_thw(grid: torch.Tensor) -> torch.Tensor | None:
    """Return the processor's image grids [I, 2] (rows, columns of patches) as transformers' image_grid_thw [I, 3]."""
    if grid.numel() == 0:
        return None
    return torch.cat([torch.ones_like(grid[:, :1]), grid], dim=1)


def qwen2_vl_processor(folder: Path, model: Qwen2VLModel) -> VLMProcessor:
    """Return the folder's processor: Qwen2VLImageProcessor's resize and flattening, `<|image_pad|>` expansion."""
    settings = image_processor_settings(folder)
    kind = str(settings.get("image_processor_type", "")).removesuffix("Pil").removesuffix("Fast")
    if kind not in HF_TYPES:
        raise InputError(f"{folder}: image_processor_type {kind!r}; expected one of {list(HF_TYPES)}")
    resize, patches = qwen2_vl_processing_from_hf(settings)
    v = model.cfg.vision
    theirs = (patches.patch_size, patches.merge_size, patches.temporal_patch_size)
    if theirs != (v.patch_size, v.merge_size, v.temporal_patch_size):
        raise InputError(
            f"{folder}: the image processor's patch_size, merge_size, temporal_patch_size {theirs} differ from "
            f"the tower's {(v.patch_size, v.merge_size, v.temporal_patch_size)}"
        )
    # tokens_per_tile is unused: the expansion's count depends on each image's grid
    return VLMProcessor.from_pretrained(
        folder, patches, 1, image_token=IMAGE_PAD, dynamic_resolution=resize,
        image_prompt=Qwen2VLPrompt(v.merge_size), max_length=model.cfg.lm.max_positions,
    )  # fmt: skip


def load_qwen2_vl(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Qwen2VLGenerativeModel:
    """Return a transformers Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration folder as a
    generative model."""
    weights = read_weights(folder, dtype)
    layout = qwen2_vl_layout(set(weights))
    cfg = qwen2_vl_config_from_hf(cfg_json, tied=None if "lm_head.weight" in weights else True)
    if cfg.lm.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = build_from_weights(lambda: Qwen2VLModel(cfg), weights, qwen2_vl_key_map(cfg, layout), str(folder),
                               device, dtype)  # fmt: skip
    weights.clear()
    if device.type == "cpu":
        model.lm.prepare_for_inference()
    processor = qwen2_vl_processor(folder, model)
    video_file = video_settings_file(folder)
    video = qwen2_vl_video_from_hf(
        read_json_object(video_file) if video_file.is_file() else None, image_processor_settings(folder)
    )
    return Qwen2VLGenerativeModel(
        model, processor, generation_eos_ids(folder), cfg_json.get("model_type"), video
    )
