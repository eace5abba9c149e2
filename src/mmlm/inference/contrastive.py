"""A loaded contrastive model (CLIP, SigLIP, or audio-text CLAP-style): preprocessing + DualEncoder + similarity
and zero-shot scoring. An audio-text model reads clips through `mmlm.processing.audio.audio_batch_features`."""

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmlm.errors import InputError
from mmlm.inference.audio import AudioInput
from mmlm.models.dual_encoder import DualEncoder
from mmlm.processing.audio import audio_batch_features
from mmlm.processing.image import ImageProcessor, ImageSource
from mmlm.processing.tokenizer import TextTokenizer
from mmlm.progress import Progress

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def fill_template(template: str, name: str) -> str:
    """Return `template` with the class name put where `{}` or `{c}` marks it."""
    if "{c}" in template:
        return template.replace("{c}", name)
    if "{}" in template:
        return template.replace("{}", name)
    raise InputError(f"template {template!r} has no '{{}}' or '{{c}}' marking the class name")


class ContrastiveModel:
    """CLIP/SigLIP (or an audio-text model) ready for use: `encode_image` (`encode_audio`), `encode_text`,
    `similarity`, `classify`, `save_pretrained`."""

    def __init__(
        self,
        model: DualEncoder,
        tokenizer: TextTokenizer,
        image_processor: ImageProcessor | None,
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

    @property
    def config(self):
        """Return the model's DualEncoderConfig."""
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        """Return the device the weights live on."""
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        """Return the weights' dtype."""
        return self.model.logit_scale.dtype

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

    def save_pretrained(self, folder: str | Path, format: str = "auto") -> Path:
        """Write a transformers folder where transformers has the architecture (or `format="mmlm"`), else mmlm's."""
        from mmlm.inference.load import save

        return save(self, Path(folder), format)
