"""A loaded contrastive model (CLIP, SigLIP, or audio-text CLAP-style): preprocessing + DualEncoder + similarity
and zero-shot scoring; and reading/writing such folders (transformers CLIP/SigLIP, open_clip, or mmlm's own).
An audio-text model reads clips through `mmlm.processing.audio.audio_batch_features`."""

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoints import open_clip
from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_clip import (
    clip_config_from_hf,
    clip_key_map,
    config_to_hf,
    siglip2_config_from_hf,
    siglip_config_from_hf,
    siglip_key_map,
)
from mmlm.checkpoints.keymap import Rule, to_theirs
from mmlm.checkpoints.mmlm_format import load_mmlm_model, write_json
from mmlm.checkpoints.processor_files import image_processor_settings
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.audio import AudioInput, read_preprocessor, whisper_preprocessor
from mmlm.inference.base import LoadedModel
from mmlm.json_files import read_json_object
from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
from mmlm.processing.audio import audio_batch_features
from mmlm.processing.image import ImageProcessor, ImageSource
from mmlm.processing.naflex import HF_TYPE as NAFLEX_HF_TYPE
from mmlm.processing.naflex import NaFlexProcessor
from mmlm.processing.tokenizer import TextTokenizer, load_tokenizer
from mmlm.progress import Progress

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def fill_template(template: str, name: str) -> str:
    """Return `template` with the class name put where `{}` or `{c}` marks it."""
    if "{c}" in template:
        return template.replace("{c}", name)
    if "{}" in template:
        return template.replace("{}", name)
    raise InputError(f"template {template!r} has no '{{}}' or '{{c}}' marking the class name")


@dataclasses.dataclass(frozen=True)
class DualEncoderFormat:
    """How a transformers dual encoder's config and tensors translate to ours (used to load and to export)."""

    config_from_hf: Callable[[dict[str, Any]], DualEncoderConfig]
    key_map: Callable[[DualEncoderConfig], list[Rule]]


DUAL_ENCODER_FORMATS = {
    "clip": DualEncoderFormat(clip_config_from_hf, clip_key_map),
    "siglip": DualEncoderFormat(siglip_config_from_hf, siglip_key_map),
    "siglip2": DualEncoderFormat(siglip2_config_from_hf, siglip_key_map),  # NaFlex: the same tensors
}


class ContrastiveModel(LoadedModel):
    """CLIP/SigLIP (or an audio-text model) ready for use: `encode_image` (`encode_audio`), `encode_text`,
    `similarity`, `classify`, `save_pretrained`."""

    architecture = "dual_encoder"
    reference_weight = "logit_scale"

    def __init__(
        self,
        model: DualEncoder,
        tokenizer: TextTokenizer,
        image_processor: ImageProcessor | NaFlexProcessor | None,
        audio_preprocessor: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor  # None for an audio-text model
        self.audio_preprocessor = audio_preprocessor  # WhisperFeatureExtractor keys; None for an image model

    @property
    def modality(self) -> str:
        """Return what the non-text tower reads: "image" or "audio"."""
        return self.model.cfg.modality

    def _require(self, modality: str) -> None:
        if self.modality != modality:
            raise InputError(
                f"this is an {self.modality}-text model; it cannot encode {modality} "
                f"(use encode_{self.modality} / --{self.modality})"
            )

    @torch.inference_mode()
    def encode_image(
        self, images: Sequence[ImageSource], batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """Return L2-normalised image embeddings [N, D] (fp32, on the model's device) for PIL images or paths.

        With `progress`, a bar (or log lines off a terminal) shows images done and images/s.
        """
        self._require("image")
        if isinstance(images, (str, Path)) or not len(images):
            raise InputError("encode_image expects a non-empty list of images or paths")
        bar = Progress(len(images), desc="images", enabled=progress)
        out, started = [], time.perf_counter()
        for start in range(0, len(images), batch_size):
            pixels = self.image_processor(images[start : start + batch_size]).to(self.device, self.dtype)
            out.append(self.model.encode_image(pixels).float())
            done = min(start + batch_size, len(images))
            bar.update(done, {"images/s": done / (time.perf_counter() - started)})
        bar.close()
        return torch.cat(out)

    @torch.inference_mode()
    def encode_audio(
        self,
        audio: AudioInput,
        sampling_rate: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> torch.Tensor:
        """Return L2-normalised audio embeddings [N, D] (fp32, on the model's device) of clips: paths, bytes or
        1-D sample arrays at `sampling_rate` (default: the preprocessor's, 16 kHz), or a list of them."""
        self._require("audio")
        clips = list(audio) if isinstance(audio, list | tuple) else [audio]
        if not clips:
            raise InputError("encode_audio expects a non-empty list of clips (paths or 1-D sample arrays)")
        bar = Progress(len(clips), desc="clips", enabled=progress)
        out, started = [], time.perf_counter()
        for start in range(0, len(clips), batch_size):
            features = audio_batch_features(
                clips[start : start + batch_size], self.config.audio, self.audio_preprocessor, sampling_rate
            )
            out.append(self.model.encode_audio(features.to(self.device, self.dtype)).float())
            done = min(start + batch_size, len(clips))
            bar.update(done, {"clips/s": done / (time.perf_counter() - started)})
        bar.close()
        return torch.cat(out)

    def encode_inputs(
        self, inputs: Sequence[Any], batch_size: int = 32, progress: bool = False
    ) -> torch.Tensor:
        """Return normalised embeddings [N, D] of images or audio clips, whichever this model's tower reads."""
        if self.modality == "audio":
            return self.encode_audio(inputs, batch_size=batch_size, progress=progress)
        return self.encode_image(inputs, batch_size, progress)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Return L2-normalised text embeddings [M, D] (fp32, on the model's device)."""
        if isinstance(texts, str) or not len(texts):
            raise InputError("encode_text expects a non-empty list of texts")
        out = []
        for start in range(0, len(texts), batch_size):
            ids = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(self.model.encode_text(ids).float())
        return torch.cat(out)

    @torch.inference_mode()
    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Return image-text logits [N, M] from normalised embeddings, with the checkpoint's scale (and bias)."""
        return self.model.logits(image_emb.to(self.dtype), text_emb.to(self.dtype)).float()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Return softmax over texts (CLIP) or an independent sigmoid per pair (SigLIP)."""
        return logits.sigmoid() if self.config.family == "siglip" else logits.softmax(-1)

    def similarity(
        self, images: Sequence[ImageSource] | AudioInput, texts: Sequence[str], batch_size: int = 32
    ) -> torch.Tensor:
        """Return probabilities [N, M] of each text matching each image (each clip, for an audio-text model)."""
        return self.probabilities(
            self.logits(self.encode_inputs(images, batch_size), self.encode_text(texts))
        )

    def class_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Return one embedding per class [K, D]: templates embedded, normalised, averaged, renormalised."""
        if not len(class_names):
            raise InputError("classify expects at least one class name")
        templates = list(templates or DEFAULT_TEMPLATES)
        prompts = [fill_template(t, c) for c in class_names for t in templates]
        emb = self.encode_text(prompts).view(len(class_names), len(templates), -1).mean(1)
        return torch.nn.functional.normalize(emb, dim=-1)

    def classify(
        self,
        images: Sequence[ImageSource],
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Return zero-shot probabilities [N, K] over the classes (softmax of the scaled cosines)."""
        image_emb = self.encode_inputs(images, batch_size)
        logits = self.logits(image_emb, self.class_embeddings(class_names, templates))
        return logits.softmax(-1)

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in self.model.state_dict().items()}

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        family = hf_family(self.config)
        if family is None:
            return None
        return config_to_hf(self.config), to_theirs(
            weights, DUAL_ENCODER_FORMATS[family].key_map(self.config)
        )

    def _save_files(self, folder: Path) -> None:
        if self.config.audio is not None:
            preprocessor = self.audio_preprocessor or whisper_preprocessor(self.config.audio)
        else:
            preprocessor = self.image_processor.to_hf()
        write_json(folder / "preprocessor_config.json", preprocessor)
        self.tokenizer.save(folder)


def hf_family(cfg: DualEncoderConfig) -> str | None:
    """Return the transformers model_type that represents `cfg` exactly, or None if none does."""
    family = "siglip2" if cfg.family == "siglip" and cfg.vision.positions == "naflex" else cfg.family
    fmt = DUAL_ENCODER_FORMATS.get(family)
    if fmt is None or cfg.audio is not None:  # transformers' ClapModel has an HTSAT tower, not Whisper's
        return None
    back = fmt.config_from_hf(config_to_hf(cfg))
    # padding masks follow the tokenizer files, which are saved beside the weights
    text = dataclasses.replace(back.text, mask_padding=cfg.text.mask_padding)
    same = dataclasses.replace(back, logit_scale_init=cfg.logit_scale_init, logit_bias_init=cfg.logit_bias_init,
                               logit_scale_max=cfg.logit_scale_max, text=text)  # fmt: skip
    return family if same == cfg else None


def default_processor(cfg: DualEncoderConfig) -> ImageProcessor | NaFlexProcessor:
    """Return the family's standard preprocessing at the model's resolution (NaFlex: its position grid's patches)."""
    if cfg.vision.positions == "naflex":
        return NaFlexProcessor(cfg.vision.patch_size, cfg.vision.grid**2)
    size = cfg.vision.image_size
    return ImageProcessor.siglip(size) if cfg.family == "siglip" else ImageProcessor.clip(size)


def returns_attention_mask(folder: Path) -> bool:
    """Return whether the folder's tokenizer gives transformers an attention mask (tokenizer_config.json's
    model_input_names; transformers' tokenizers return one unless told not to)."""
    path = folder / "tokenizer_config.json"
    names = read_json_object(path).get("model_input_names") if path.is_file() else None
    return names is None or "attention_mask" in names


def image_processor_from_hf(settings: dict[str, Any]) -> ImageProcessor | NaFlexProcessor:
    """Return the image processor a transformers config dict describes: NaFlex (SigLIP 2) or CLIP/SigLIP's."""
    kind = str(settings.get("image_processor_type", "")).removesuffix("Pil").removesuffix("Fast")
    return NaFlexProcessor.from_hf(settings) if kind == NAFLEX_HF_TYPE else ImageProcessor.from_hf(settings)


def load_hf_dual_encoder(
    family: str, folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ContrastiveModel:
    """Return a transformers CLIPModel or SiglipModel folder as a ContrastiveModel."""
    fmt = DUAL_ENCODER_FORMATS[family]
    cfg = fmt.config_from_hf(cfg_json)
    if cfg.family == "siglip" and returns_attention_mask(folder):
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, mask_padding=True))
    model = build_from_weights(
        lambda: DualEncoder(cfg), read_weights(folder), fmt.key_map(cfg), str(folder), device, dtype
    )
    settings = image_processor_settings(folder, required=False)
    processor = image_processor_from_hf(settings) if settings is not None else default_processor(cfg)
    tokenizer = load_tokenizer(folder, cfg.text.context_length, cfg.text.padding)
    return ContrastiveModel(model, tokenizer, processor)


def load_mmlm_dual_encoder(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ContrastiveModel:
    """Return an mmlm dual_encoder folder (image-text or audio-text) as a ContrastiveModel."""
    model = load_mmlm_model(folder, cfg_json, DualEncoderConfig, DualEncoder, device, dtype)
    cfg = model.cfg
    tokenizer = load_tokenizer(folder, cfg.text.context_length, cfg.text.padding)
    if cfg.audio is not None:
        return ContrastiveModel(model, tokenizer, None, read_preprocessor(folder, cfg.audio))
    processor = image_processor_from_hf(image_processor_settings(folder))
    return ContrastiveModel(model, tokenizer, processor)


def load_open_clip(folder: Path, device: torch.device, dtype: torch.dtype) -> ContrastiveModel:
    """Return an open_clip hub folder (open_clip_config.json + open_clip_model.safetensors) as a ContrastiveModel."""
    model = open_clip.load_open_clip_weights(folder, device, dtype)
    if not (folder / "tokenizer.json").is_file():
        raise InputError(
            f"{folder}: open_clip folders carry no tokenizer; write its tokenizer.json once with "
            "mmlm.checkpoints.open_clip.write_open_clip_tokenizer(<open_clip's bpe_simple_vocab_16e6.txt.gz>, folder)"
        )
    preprocess = read_json_object(folder / open_clip.CONFIG_NAME).get("preprocess_cfg") or {}
    processor = default_processor(model.cfg)
    mean, std = preprocess.get("mean", processor.mean), preprocess.get("std", processor.std)
    processor = dataclasses.replace(processor, mean=tuple(mean), std=tuple(std))
    tokenizer = load_tokenizer(folder, model.cfg.text.context_length, model.cfg.text.padding)
    return ContrastiveModel(model, tokenizer, processor)
