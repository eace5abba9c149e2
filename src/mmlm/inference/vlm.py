"""A loaded vision-language model: VisionLanguageModel + VLMProcessor, with `generate`, `stream`, `chat` and
`save_pretrained`; and reading/writing such folders (transformers LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM, or mmlm's own format).

A str prompt is used as written, with `<image>` where each image goes (`<audio>` each audio clip, `<video>` each
video); a list of chat messages gets the checkpoint's chat template (or the built-in LLaVA v1 / ChatML one) with
the generation prompt appended.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_blip2 import (
    TEXT_ONLY,
    blip2_config_to_hf,
    blip2_representable,
    blip2_vlm_key_map,
    fuse_vision_qkv_bias,
    vlm_config_from_blip2,
)
from mmlm.checkpoints.hf_idefics3 import (
    idefics3_config_to_hf,
    idefics3_key_map,
    idefics3_representable,
    vlm_config_from_idefics3,
)
from mmlm.checkpoints.hf_llava import (
    LLAVA_NEXT_PINPOINTS,
    llava_config_to_hf,
    llava_key_map,
    llava_layout,
    llava_representable,
    vlm_config_from_llava,
)
from mmlm.checkpoints.keymap import to_theirs
from mmlm.checkpoints.mmlm_format import load_mmlm_model, write_json
from mmlm.checkpoints.processor_files import (
    check_image_tokens,
    image_processor_settings,
    llava_processor_config,
    processor_settings,
)
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.audio import whisper_preprocessor
from mmlm.inference.base import GenerativeBase, check_request, end_token_ids, generation_settings
from mmlm.inference.causal_lm import generation_eos_ids
from mmlm.inference.generation import GenerationSettings, generate_ids, vlm_step
from mmlm.models.vlm import VisionLanguageModel, VLMConfig
from mmlm.processing.anyres import DynamicResolution
from mmlm.processing.idefics3_image import (
    HF_TYPES as IDEFICS3_IMAGE_PROCESSORS,
)
from mmlm.processing.idefics3_image import (
    Idefics3Splitting,
    idefics3_processing_from_hf,
    idefics3_processing_to_hf,
)
from mmlm.processing.idefics3_prompt import Idefics3Prompt
from mmlm.processing.image import ImageProcessor, ImageSource
from mmlm.processing.vlm_processor import VLMProcessor

Prompt = str | Sequence[dict[str, Any]]


class GenerativeModel(GenerativeBase):
    """A VLM ready for use: `generate`, `stream`, `chat`, `save_pretrained`."""

    architecture = "vlm"
    reference_weight = "lm.token_embed.weight"
    prepares_embeddings = True

    def __init__(
        self,
        model: VisionLanguageModel,
        processor: VLMProcessor,
        eos_token_ids: Sequence[int] | None = None,
        source_format: str | None = None,
    ) -> None:
        if processor.image_token_id != model.cfg.image_token_id:
            raise InputError(
                f"the tokenizer's image token has id {processor.image_token_id}, the model expects "
                f"{model.cfg.image_token_id}"
            )
        if processor.tokens_per_tile != model.image_tokens:
            raise InputError(
                f"the processor reserves {processor.tokens_per_tile} tokens per image, the model makes "
                f"{model.image_tokens}"
            )
        if (processor.spatial_unpad is None) != (model.anyres is None):
            raise InputError(
                f"the processor's image token counts are for patch_merge "
                f"{'flat' if processor.spatial_unpad is None else 'spatial_unpad'}, the model merges "
                f"{model.cfg.patch_merge}"
            )
        if processor.tokens_per_audio != model.audio_tokens or (
            model.audio_tokens and processor.audio_token_id != model.cfg.audio_token_id
        ):
            raise InputError(
                f"the processor reserves {processor.tokens_per_audio} tokens per audio clip (id "
                f"{processor.audio_token_id}), the model makes {model.audio_tokens} (id {model.cfg.audio_token_id})"
            )
        self._hold(model, processor, eos_token_ids, source_format)

    def _hold(self, model: torch.nn.Module, processor: VLMProcessor, eos_token_ids: Sequence[int] | None,
              source_format: str | None) -> None:  # fmt: skip
        """Keep the model and processor, and the ids generation stops at (the config's, the caller's, the
        tokenizer's eos)."""
        self.model = model
        self.processor = processor
        self.source_format = source_format
        end = processor.tokenizer.token_to_id(processor.eos_token) if processor.eos_token else None
        self.eos_token_ids = end_token_ids(model.cfg.lm.eos_token_ids, eos_token_ids, end)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of token ids, special tokens skipped."""
        ids = self.model.style.text_ids(self.config.connector, ids, self.config.lm.vocab_size)
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prepare(self, prompts: list[Prompt], images: list[list[ImageSource]] | None, settings, cache: str,
                 audio: list[list[Any]] | None = None, sampling_rate: int | None = None,
                 videos: list[list[Any]] | None = None, num_frames: int = 8, video_fps: float | None = None):  # fmt: skip
        """Return (step, cache, settings cut to the context, prompt embeddings, mask or None) for a batch of prompts."""
        check_request(settings, cache, graph=True)
        batch = self.processor(prompts, images, add_generation_prompt=True, padding_side="left", audio=audio,
                               sampling_rate=sampling_rate, videos=videos, num_frames=num_frames,
                               video_fps=video_fps, video_pool=self.config.video_pool)  # fmt: skip
        ids, mask, settings = self._fit_context(batch, settings)
        pixels, sound, frames = batch["pixel_values"], batch["audio_features"], batch["image_frames"]
        with torch.inference_mode():
            embeds, media = self.model.prepare(
                ids,
                None if pixels is None else pixels.to(self.device, self.dtype),
                None if sound is None else sound.to(self.device, self.dtype),
                frames,
                batch["image_sizes"],
            )
        length = ids.shape[1] + settings.max_new_tokens
        if cache == "graph":
            if media is not None:
                raise InputError(f"cache: 'graph' decodes fusion styles that keep no cache of their own; "
                                 f"{self.model.kind} keeps one, use 'static' or 'dynamic'")  # fmt: skip
            kv = self._fixed_cache(self.model.lm, ids.shape[0], length)
        else:  # the style's media ride in the cache (see vlm_step)
            kv = self.model.new_cache(ids.shape[0], length if cache == "static" else None, media)
        return vlm_step(self.model), kv, settings, embeds, (None if bool(mask.all()) else mask)

    def _fit_context(self, batch: dict[str, Any], settings: GenerationSettings) -> tuple[torch.Tensor, torch.Tensor, GenerationSettings]:  # fmt: skip
        """Return a processed batch's ids and mask on the device, and `settings` with max_new_tokens cut to the
        room the prompt leaves in the context (one line when there is none)."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        room = self.config.lm.max_positions - ids.shape[1]
        if room <= 0:
            raise InputError(
                f"prompt: {ids.shape[1]} tokens (image and video tokens included), but the model's context holds "
                f"{self.config.lm.max_positions}"
            )
        return ids, mask, dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, room))

    def _only_images(self, family: str, audio: Any, videos: Any) -> None:
        """Refuse audio clips and videos in a request to a model that reads images only."""
        if any(any(media) for media in (*(videos or ()), *(audio or ()))):
            raise InputError(f"videos, audio: mmlm reads {family} images only")

    @staticmethod
    def _batch(prompt, images) -> tuple[list[Prompt], list[list[ImageSource]] | None, bool]:
        if isinstance(images, (str, Path, bytes)):  # one image given bare, not in a list
            images = [images]
        single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], dict))
        if single:
            return [prompt], None if images is None else [list(images)], True
        return list(prompt), None if images is None else [list(i) for i in images], False

    @staticmethod
    def _per_prompt(media, single: bool) -> list[list[Any]] | None:
        """Return audio clips or videos as one list per prompt (a bare one, path or sample array, is one)."""
        if media is None:
            return None
        if isinstance(media, (str, Path, bytes, np.ndarray)):
            media = [media]
        return [list(media)] if single else [[a] if isinstance(a, (str, Path, bytes, np.ndarray)) else list(a)
                                              for a in media]  # fmt: skip

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        cache: str = "static",
        videos: Sequence[Any] | None = None,
        num_frames: int = 8,
        video_fps: float | None = None,
        audio: Sequence[Any] | None = None,
        sampling_rate: int | None = None,
    ) -> str | list[str]:
        """Return the new text for one prompt and its images, or a list for a batch (a list of image lists).

        temperature 0 is greedy; a sequence ends at an end token, before the first `stop` string, after
        max_new_tokens, or when the context is full. Batches are left-padded and decoded together. `cache`
        "static" preallocates the KV cache, "dynamic" grows it, "graph" decodes with fixed shapes, each step a
        CUDA graph replay on a GPU, no host synchronisation per token (fusion styles without a cache of their
        own; mmlm.inference.graph_decode); all give the same tokens. `videos`
        fill `<video>` placeholders (or video parts) with `num_frames` frames each, uniform or at `video_fps`;
        `audio` clips (paths, bytes, or sample arrays at `sampling_rate`, default 16 kHz) fill `<audio>` ones.
        """
        prompts, image_lists, single = self._batch(prompt, images)
        settings = generation_settings(max_new_tokens, temperature, top_k, top_p, stop, seed)
        audio, videos = self._per_prompt(audio, single), self._per_prompt(videos, single)
        prepared = self.prepare(
            prompts, image_lists, settings, cache, audio, sampling_rate, videos, num_frames, video_fps
        )
        texts = self._generate_texts(prepared)
        return texts[0] if single else texts

    def generate_tokens(
        self, prompt: Prompt, images: Sequence[ImageSource] | None = None, max_new_tokens: int = 64
    ) -> list[int]:
        """Return the greedy new token ids for one prompt (end token excluded)."""
        prompts, image_lists, _ = self._batch(prompt, images)
        settings = GenerationSettings(max_new_tokens)
        step, kv, settings, embeds, mask = self.prepare(prompts, image_lists, settings, "dynamic")
        return [t for tokens in generate_ids(step, kv, settings, self.eos_token_ids, None, embeds, mask)
                for _, t in tokens]  # fmt: skip

    def stream(
        self,
        prompt: Prompt,
        images: Sequence[ImageSource] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        videos: Sequence[Any] | None = None,
        num_frames: int = 8,
        video_fps: float | None = None,
        audio: Sequence[Any] | None = None,
        sampling_rate: int | None = None,
    ) -> Iterator[str]:
        """Yield the new text of one prompt in pieces; they join to what `generate` returns."""
        prompts, image_lists, single = self._batch(prompt, images)
        if not single:
            raise InputError("stream: expected one prompt")
        settings = generation_settings(max_new_tokens, temperature, top_k, top_p, stop, seed)
        audio, videos = self._per_prompt(audio, True), self._per_prompt(videos, True)
        prepared = self.prepare(
            prompts, image_lists, settings, "static", audio, sampling_rate, videos, num_frames, video_fps
        )
        yield from self._stream_pieces(prepared)

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """A transformers LLaVA, Idefics3 / SmolVLM or BLIP-2 folder, where one represents the model."""
        if blip2_representable(self.config):
            hf = blip2_config_to_hf(self.config, self.model.image_tokens)
            return hf, to_theirs(weights, blip2_vlm_key_map(self.config))
        if idefics3_representable(self.config):
            model_type = self.source_format if self.source_format in ("idefics3", "smolvlm") else "idefics3"
            return idefics3_config_to_hf(self.config, model_type), to_theirs(
                weights, idefics3_key_map(self.config)
            )
        lm_type = llava_representable(self.config)
        if lm_type is None:
            return None
        return llava_config_to_hf(self.config, lm_type), to_theirs(weights, llava_key_map(self.config))

    def _save_files(self, folder: Path) -> None:
        cfg, processor = self.config, self.processor
        processor.tokenizer.save(str(folder / "tokenizer.json"))
        tokenizer_config = {**processor.special_tokens, "model_max_length": cfg.lm.max_positions,
                            "chat_template": processor.chat_template.source}  # fmt: skip
        write_json(folder / "tokenizer_config.json", tokenizer_config)
        if processor.images_first:  # Blip2Processor's own file: it puts K image tokens before the text
            write_json(folder / "processor_config.json", {"num_query_tokens": processor.tokens_per_tile})
        if isinstance(processor.dynamic_resolution, Idefics3Splitting):
            settings = idefics3_processing_to_hf(processor.dynamic_resolution, processor.image_processor)
            write_json(folder / "preprocessor_config.json", settings)
            write_json(folder / "processor_config.json", {"image_seq_len": processor.tokens_per_tile})
        else:
            image_settings = processor.image_processor.to_hf()
            if processor.spatial_unpad is not None:  # LLaVA-NeXT's tiling rides in the same file
                image_settings.update(processor.dynamic_resolution.to_hf())
            write_json(folder / "preprocessor_config.json", image_settings)
        size = _fixed_output_size(processor.image_processor)
        # LlavaProcessor expands every image into one fixed grid of the tower's own size: no tiles
        square = (cfg.vision.image_size, cfg.vision.image_size)
        if llava_representable(cfg) and size == square and processor.dynamic_resolution is None:
            write_json(folder / "processor_config.json", llava_processor_config(
                cfg.vision.patch_size, cfg.feature_select, self.model.image_tokens, size, processor.image_token
            ))  # fmt: skip
            # transformers' processors read their template from this file only, not tokenizer_config.json
            (folder / "chat_template.jinja").write_text(processor.chat_template.source, encoding="utf-8")
        generation = {"bos_token_id": cfg.lm.bos_token_id, "eos_token_id": self.eos_token_ids,
                      "pad_token_id": cfg.lm.pad_token_id}  # fmt: skip
        write_json(folder / "generation_config.json", generation)


def _processor(folder: Path, model: VisionLanguageModel, images_first: bool = False) -> VLMProcessor:
    """The folder's processor: its image processor's settings pick plain views or Idefics3's split + prompt;
    BLIP-2's (`images_first`, or Blip2Processor's num_query_tokens in processor_config.json) puts images first."""
    cfg = model.cfg
    images_first = images_first or "num_query_tokens" in processor_settings(folder)
    settings = image_processor_settings(folder)
    audio = {} if cfg.audio is None else dict(
        tokens_per_audio=model.audio_tokens, audio_config=cfg.audio, audio_preprocessor=whisper_preprocessor(cfg.audio)
    )  # fmt: skip
    kind = str(settings.get("image_processor_type", "")).removesuffix("Pil").removesuffix("Fast")
    if kind in IDEFICS3_IMAGE_PROCESSORS:
        splitting, image_processor = idefics3_processing_from_hf(settings)
        if splitting.max_image_size != cfg.vision.image_size:
            raise InputError(
                f"{folder}: max_image_size {splitting.max_image_size} px, but mmlm reads Idefics3 tiles at the "
                f"tower's image_size ({cfg.vision.image_size} px), as the released checkpoints use"
            )
        seq_len = processor_settings(folder).get("image_seq_len", model.image_tokens)
        if seq_len != model.image_tokens:
            raise InputError(
                f"{folder}: image_seq_len {seq_len} in processor_config.json, but the model makes "
                f"{model.image_tokens} tokens per tile"
            )
        audio.update(dynamic_resolution=splitting, image_prompt=Idefics3Prompt(model.image_tokens))
    else:
        image_processor = ImageProcessor.from_hf(settings)
    anyres = {} if model.anyres is None else dict(
        dynamic_resolution=_tiling(folder, settings, model), spatial_unpad=model.anyres
    )  # fmt: skip
    return VLMProcessor.from_pretrained(
        folder, image_processor, model.image_tokens, max_length=cfg.lm.max_positions, images_first=images_first,
        **audio, **anyres,
    )  # fmt: skip


def _tiling(folder: Path, settings: dict[str, Any], model: VisionLanguageModel) -> DynamicResolution:
    """LLaVA-NeXT's tiling from the image processor's settings; it must cut the grids the model merges."""
    tiler = DynamicResolution.from_hf(settings, LLAVA_NEXT_PINPOINTS)
    grids = (model.anyres.tile_size, list(model.anyres.resolutions))
    if (tiler.tile_size, list(tiler.resolutions)) != grids:
        raise InputError(
            f"{folder}: the image processor cuts {tiler.tile_size}-px tiles on image_grid_pinpoints "
            f"{[list(r) for r in tiler.resolutions]}, but config.json's model merges {grids[0]}-px tiles on "
            f"{[list(r) for r in grids[1]]}"
        )
    return tiler


def _fixed_output_size(image_processor: ImageProcessor) -> tuple[int, int] | None:
    # the (height, width) every image leaves the processor at; None when it follows the input's aspect ratio
    if image_processor.crop_size is not None:
        return image_processor.crop_size
    fixed = image_processor.do_resize and isinstance(image_processor.size, tuple)
    return image_processor.size if fixed else None


def _load_hf_vlm(folder: Path, cfg: VLMConfig, rules: list, head: str, dtype: torch.dtype,
                 device: torch.device, weights: dict[str, torch.Tensor], source_format: str,
                 images_first: bool = False) -> GenerativeModel:  # fmt: skip
    if cfg.lm.tie_word_embeddings:
        weights.pop(head, None)
    model = build_from_weights(lambda: VisionLanguageModel(cfg), weights, rules, str(folder), device, dtype)
    weights.clear()
    if device.type == "cpu":
        model.lm.prepare_for_inference()  # the decode layout: same values, faster CPU matrix-vector products
    return GenerativeModel(
        model, _processor(folder, model, images_first), generation_eos_ids(folder), source_format
    )


def load_blip2(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> GenerativeModel:
    """Return a transformers Blip2ForConditionalGeneration folder (OPT LM) as a GenerativeModel."""
    try:
        cfg = vlm_config_from_blip2(cfg_json)
    except InputError as error:
        raise InputError(f"{folder / 'config.json'}: {error}") from None
    weights = read_weights(folder, dtype)
    fuse_vision_qkv_bias(weights)  # files written before transformers 5 keep q_bias and v_bias apart
    # the Q-Former's text-token FFN and embeddings serve BLIP-2's stage-1 objectives only (see hf_blip2)
    for name in [k for k in weights if TEXT_ONLY.match(k)]:
        del weights[name]
    return _load_hf_vlm(folder, cfg, blip2_vlm_key_map(cfg), "language_model.lm_head.weight", dtype, device,
                        weights, "blip-2", images_first=True)  # fmt: skip


def load_llava(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> GenerativeModel:
    """Return a transformers LlavaForConditionalGeneration or LlavaNextForConditionalGeneration folder as a
    GenerativeModel."""
    try:
        cfg = vlm_config_from_llava(cfg_json)
    except InputError as error:
        raise InputError(f"{folder / 'config.json'}: {error}") from None
    weights = read_weights(folder, dtype)  # cast as read: a bf16 load never holds fp32 weights
    layout = llava_layout(set(weights))
    loaded = _load_hf_vlm(folder, cfg, llava_key_map(cfg, layout), f"{layout.head}.weight", dtype, device, weights,
                          cfg_json.get("model_type", "llava"))  # fmt: skip
    check_image_tokens(
        folder, loaded.model.image_tokens, _fixed_output_size(loaded.processor.image_processor)
    )
    return loaded


def load_idefics3(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> GenerativeModel:
    """Return a transformers Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration folder as a
    GenerativeModel."""
    weights = read_weights(folder, dtype)
    # a head-less checkpoint is tied whatever its config says (transformers 4 read the text config's flag)
    cfg = vlm_config_from_idefics3(cfg_json, tied=None if "lm_head.weight" in weights else True)
    return _load_hf_vlm(folder, cfg, idefics3_key_map(cfg), "lm_head.weight", dtype, device, weights,
                        cfg_json.get("model_type", "idefics3"))  # fmt: skip


def load_mmlm_vlm(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> GenerativeModel:
    """Return an mmlm `vlm` folder (our config and tensor names) as a GenerativeModel."""
    model = load_mmlm_model(
        folder, cfg_json, VLMConfig, VisionLanguageModel, device, dtype, cast_as_read=True
    )
    if device.type == "cpu":
        model.lm.prepare_for_inference()
    return GenerativeModel(model, _processor(folder, model), generation_eos_ids(folder))
