"""The VLM processor: (conversation or prompt, images) -> input_ids, attention_mask, labels, pixel_values.

The processor, not the model, decides how many image tokens each image gets: every `<image>` placeholder
becomes tiles × `tokens_per_tile` copies of the image token id (tiles = 1 without dynamic resolution), so
the model can fill them without a Python loop:

    features = connector(vision(pixel_values))                    # [T, N', D], T = all tiles in the batch
    inputs_embeds[input_ids == image_token_id] = features.reshape(-1, D)

That works because the image tokens appear in the order of `pixel_values`: sample by sample in the batch,
image by image in each prompt, and tile by tile (in the tiling's order) in each image. Under LLaVA-NeXT's
spatial_unpad merge (`spatial_unpad`, mmlm.models.anyres) an image instead gets the count its size gives
(global view + un-padded tile canvas + one newline per row), exactly as LlavaNextProcessor reserves them.

A model whose prompts mark the tiles (Idefics3: row/column tokens around each tile's image tokens) gives an
`image_prompt`: each placeholder then becomes the ids of that expansion instead of bare image tokens.

Audio clips work the same way: every `<audio>` (or audio part) becomes `tokens_per_audio` copies of the audio
token id, and the clip becomes Whisper log-mel features [n_mels, 2·max_frames] in `audio_features`, in order.

A model whose images always open the sequence (BLIP-2: `images_first`) takes prompts without `<image>`: each
image's tokens are put before everything, BOS included, as Blip2Processor writes them (placeholders a prompt
does hold, with the newline after each, are taken out of the text first).

Labels are the input ids (not shifted; the model shifts) on assistant answers and their end-of-turn token,
-100 everywhere else. A sample that `max_length` would cut inside its image or audio tokens is dropped, not cut.
"""

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from tokenizers import AddedToken, Tokenizer

from mmlm.errors import InputError
from mmlm.models.anyres import SpatialUnpad
from mmlm.models.audio_encoder import AudioConfig
from mmlm.processing.anyres import TiledImage
from mmlm.processing.audio import audio_batch_features
from mmlm.processing.chat import (
    AUDIO_TOKEN,
    IMAGE_TOKEN,
    ChatTemplate,
    Message,
    check_messages,
    special_tokens_of,
)
from mmlm.processing.image import ImageProcessor, ImageSource, load_image
from mmlm.processing.padding import pad_rows
from mmlm.processing.video_prompt import expand_videos, frame_sampler

IGNORE_INDEX = -100  # labels the loss skips (torch's cross_entropy default ignore_index)
Prompt = str | Sequence[Message]
PaddingSide = Literal["left", "right"]


class ImageTiling(Protocol):
    """Cuts an image into encoder-sized views (anyres.DynamicResolution, idefics3_image.Idefics3Splitting)."""

    def num_tiles(self, height: int, width: int) -> int:
        """Return how many views an image of this size becomes."""

    def __call__(self, image: Any) -> TiledImage:
        """Return the image's views in prompt order and its grid."""


class ImagePrompt(Protocol):
    """The token ids one `<image>` becomes, given its tiling grid (idefics3_prompt.Idefics3Prompt,
    qwen2_vl_prompt.Qwen2VLPrompt)."""

    def ids(self, tokenizer: Tokenizer, grid: tuple[int, int]) -> list[int]:
        """Return the ids of one image's expansion; its image tokens fill the model's slots in order."""

    def image_tokens(self, grid: tuple[int, int], views: int, tokens_per_view: int) -> int:
        """Return the image tokens the model fills for one image of `views` views and this grid."""


@dataclass
class EncodedSample:
    """One prompt, tokenised and expanded: ids and labels [L], its images' tiles [T, 3, H, W] and tile info."""

    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX outside answers
    # [T, 3, H, W] float32 (uint8 from `with_uint8_pixels`), T = sum(image_tiles); None without images
    pixel_values: torch.Tensor | None
    image_tiles: list[int] = field(default_factory=list)  # tiles per image, global view included
    image_grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, cols) tiled; (0, 0) untiled
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # original (height, width)
    audio_features: torch.Tensor | None = None  # [A, n_mels, frames] float32 log-mel; None without audio
    # pixel_values rows per image slot: 1, or a video slot's frames
    image_frames: list[int] = field(default_factory=list)


def add_image_token(tokenizer: Tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """Return the id of `image_token` (or any placeholder, e.g. `<audio>`), adding it to `tokenizer` (in place) as
    a special token if missing."""
    if tokenizer.token_to_id(image_token) is None:
        tokenizer.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
    return tokenizer.token_to_id(image_token)


def images_in(messages: Sequence[Message], kind: str = "image") -> list[Any]:
    """Return the media carried by parts of `kind` ({"type": kind, kind | "path": ...}), in order."""
    found = []
    for message in messages:
        content = message["content"]
        for part in content if not isinstance(content, str) else ():
            source = part.get(kind, part.get("path")) if part["type"] == kind else None
            if source is not None:
                found.append(source)
    return found


def drop_placeholders(
    text: str, spans: tuple[tuple[int, int], ...], placeholder: str, images: int
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Return `text` without its `placeholder`s (each with the newline after it) and `spans` moved to match.

    Raise InputError when the text holds placeholders, but not one per image.
    """
    pattern = re.compile(re.escape(placeholder) + r"\n?")
    cuts = [(m.start(), m.end()) for m in pattern.finditer(text)]
    if cuts and len(cuts) != images:
        raise InputError(f"images: got {images} image(s) for {len(cuts)} {placeholder} placeholder(s)")

    def moved(position: int) -> int:
        return position - sum(min(end, position) - start for start, end in cuts if start < position)

    return pattern.sub("", text), tuple((moved(a), moved(b)) for a, b in spans)


class VLMProcessor:
    """Tokenises prompts with a chat template, expands image placeholders, masks labels, preprocesses images."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        tokens_per_tile: int,
        *,
        chat_template: ChatTemplate | None = None,
        image_token: str = IMAGE_TOKEN,
        dynamic_resolution: ImageTiling | None = None,
        image_prompt: ImagePrompt | None = None,
        max_length: int | None = None,
        special_tokens: Mapping[str, str] | None = None,
        tokens_per_audio: int = 0,
        audio_config: AudioConfig | None = None,
        audio_preprocessor: Mapping[str, Any] | None = None,
        spatial_unpad: SpatialUnpad | None = None,
        images_first: bool = False,
        prompt_suffix: str = "",
    ) -> None:
        if tokens_per_tile < 1:
            raise InputError(f"tokens_per_tile: got {tokens_per_tile}; expected at least 1")
        if spatial_unpad is not None and dynamic_resolution is None:
            raise InputError("spatial_unpad: the LLaVA-NeXT merge needs dynamic_resolution to cut the tiles")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens_per_tile = tokens_per_tile
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None or tokenizer.encode(image_token, add_special_tokens=False).ids != [
            self.image_token_id
        ]:
            raise InputError(
                f"image_token: {image_token!r} is not one token of the tokenizer; add it (add_image_token)"
            )
        self.tokens_per_audio = tokens_per_audio if audio_config is not None else 0
        self.audio_config = audio_config
        self.audio_preprocessor = dict(audio_preprocessor or {})
        self.audio_token_id = tokenizer.token_to_id(AUDIO_TOKEN)
        if self.tokens_per_audio and (
            self.audio_token_id is None
            or tokenizer.encode(AUDIO_TOKEN, add_special_tokens=False).ids != [self.audio_token_id]
        ):
            raise InputError(f"{AUDIO_TOKEN!r} is not one token of the tokenizer; add it (add_image_token)")
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template or self._builtin_template()
        self.dynamic_resolution = dynamic_resolution
        self.image_prompt = image_prompt
        self.spatial_unpad = spatial_unpad
        self.images_first = images_first
        # text after every prompt, before any answer (Chameleon's separator token, which ChameleonProcessor appends)
        self.prompt_suffix = prompt_suffix
        self.max_length = max_length
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        pad = self.special_tokens.get("pad_token") or self.eos_token
        self.pad_token_id = (tokenizer.token_to_id(pad) if pad else None) or 0
        self.uint8_pixels = False  # a training stream's copy sets it (`with_uint8_pixels`)

    def with_uint8_pixels(self) -> "VLMProcessor":
        """Return a copy whose pixel_values are uint8, not yet normalised (training streams: a quarter of the
        bytes through workers and to the device, normalised there by `PixelNormalize`); self if it cannot: only an
        ImageProcessor (whole images, anyres tiles) has this form, NaFlex and Qwen2-VL patches stay float32."""
        if not isinstance(self.image_processor, ImageProcessor):
            return self
        training = copy.copy(self)
        training.uint8_pixels = True
        return training

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        image_processor: ImageProcessor,
        tokens_per_tile: int,
        **options: Any,
    ) -> "VLMProcessor":
        """Return a processor over a checkpoint folder's tokenizer.json, special tokens and chat template."""
        folder = Path(folder)
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception on a missing or bad file
            raise InputError(
                f"{folder / 'tokenizer.json'}: expected a tokenizers JSON file ({error})"
            ) from error
        image_token = options.get("image_token", IMAGE_TOKEN)
        options.setdefault("chat_template", ChatTemplate.from_pretrained(folder, image_token))
        options.setdefault("special_tokens", special_tokens_of(folder))
        return cls(tokenizer, image_processor, tokens_per_tile, **options)

    def _builtin_template(self) -> ChatTemplate:
        # A vocabulary with ChatML's markers was trained on ChatML; otherwise LLaVA v1, ending turns with eos.
        if self.tokenizer.token_to_id("<|im_start|>") is not None:
            return ChatTemplate.chatml(self.image_token)
        return ChatTemplate.llava_v1(self.special_tokens.get("eos_token", "</s>"), self.image_token)

    def image_token_count(self, height: int, width: int) -> int:
        """Return how many image tokens an image of this size becomes: tiles × tokens_per_tile, or under
        spatial_unpad the global view's, the un-padded tiles' and one newline per row."""
        if self.spatial_unpad is not None:
            return self.spatial_unpad.num_tokens(height, width)
        tiles = 1 if self.dynamic_resolution is None else self.dynamic_resolution.num_tiles(height, width)
        return tiles * self.tokens_per_tile

    def render(
        self, prompt: Prompt, answer: str | None = None, add_generation_prompt: bool = False
    ) -> tuple[str, tuple[tuple[int, int], ...]]:
        """Return the prompt's text and its answers' character spans; a str is used as written (plus `prompt_suffix`
        and `answer`)."""
        if isinstance(prompt, str):
            prompt += self.prompt_suffix
            if answer is None:
                return prompt, ()
            text = prompt + answer + (self.eos_token or "")
            return text, ((len(prompt), len(text)),)
        if answer is not None:
            raise InputError("answer: only for a str prompt; put the answer in the conversation instead")
        rendered = self.chat_template.render(prompt, add_generation_prompt=add_generation_prompt)
        suffix = self.prompt_suffix if add_generation_prompt else ""
        return rendered.text + suffix, rendered.answer_spans

    def encode(
        self,
        prompt: Prompt,
        images: Sequence[ImageSource] | None = None,
        *,
        answer: str | None = None,
        add_generation_prompt: bool = False,
        audio: Sequence[Any] | None = None,
        sampling_rate: int | None = None,
        videos: Sequence[Any] | None = None,
        num_frames: int = 8,
        video_fps: float | None = None,
        video_pool: int = 1,
    ) -> EncodedSample | None:
        """Return one sample, or None when `max_length` would cut its image or audio tokens or all its answer
        tokens. `audio` clips (paths, bytes or sample arrays at `sampling_rate`) fill the `<audio>` slots;
        `videos` the `<video>` ones (or video parts), as `num_frames` frames each (uniform, or at `video_fps`)
        in image slots of `video_pool` consecutive frames."""
        if videos is not None:
            sample = frame_sampler(num_frames, video_fps)
            prompt, images = expand_videos(prompt, images, list(videos), sample, video_pool)
        if not isinstance(prompt, str):
            prompt = check_messages(prompt)
            if images is None:
                images = images_in(prompt)
            if audio is None:
                audio = images_in(prompt, "audio")
        images, audio = list(images or []), list(audio or [])
        text, spans = self.render(prompt, answer, add_generation_prompt)
        if self.images_first:
            text, spans = drop_placeholders(text, spans, self.image_token, len(images))
        # transformers' processors add the tokenizer's specials unless the template already wrote bos.
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special)
        ids = torch.tensor(encoding.ids, dtype=torch.long)
        offsets = torch.tensor(encoding.offsets, dtype=torch.long).reshape(-1, 2)  # [L, 2] characters
        starts, ends = offsets[:, 0], offsets[:, 1]
        answer = torch.zeros_like(ids, dtype=torch.bool)
        for start, end in spans:  # a token is an answer token if its characters overlap the answer
            answer |= (starts < end) & (ends > start) & (ends > starts)
        labels = torch.where(answer, ids, IGNORE_INDEX)
        if self.images_first:  # [L] -> [len(images) + L]: one placeholder per image, ahead of BOS
            ids = torch.cat([torch.full((len(images),), self.image_token_id, dtype=torch.long), ids])
            labels = torch.cat([torch.full((len(images),), IGNORE_INDEX, dtype=torch.long), labels])

        is_image = ids == self.image_token_id
        if int(is_image.sum()) != len(images):
            raise InputError(
                f"images: got {len(images)} image(s) for {int(is_image.sum())} {self.image_token} placeholder(s)"
            )
        if audio and not self.tokens_per_audio:
            raise InputError(f"audio: this model has no audio tower, so {AUDIO_TOKEN} cannot be filled")
        is_audio = (
            ids == self.audio_token_id if self.audio_token_id is not None else torch.zeros_like(is_image)
        )
        if int(is_audio.sum()) != len(audio):
            raise InputError(
                f"audio: got {len(audio)} clip(s) for {int(is_audio.sum())} {AUDIO_TOKEN} placeholder(s)"
            )
        pixel_values, tiles, grids, sizes, frames = self._images(images)
        ids, labels, is_media = self._expand(ids, labels, is_image, is_audio, tiles, grids, sizes)

        if self.max_length is not None and len(ids) > self.max_length:
            if bool(is_media[self.max_length :].any()):
                return None  # cutting would leave a part of an image or clip, or one with no tokens
            had_answer = bool((labels != IGNORE_INDEX).any())
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if had_answer and not bool((labels != IGNORE_INDEX).any()):
                return None  # nothing left to learn from
        features = (
            audio_batch_features(audio, self.audio_config, self.audio_preprocessor, sampling_rate)
            if audio
            else None
        )
        return EncodedSample(ids, labels, pixel_values, tiles, grids, sizes, features, frames)

    def _expand(self, ids: torch.Tensor, labels: torch.Tensor, is_image: torch.Tensor, is_audio: torch.Tensor,
                tiles: list[int], grids: list[tuple[int, int]],
                sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Return ids, labels (ignored on media) and the media positions with every placeholder expanded."""
        expansions = None
        if self.image_prompt is not None:
            expansions = [
                torch.tensor(self.image_prompt.ids(self.tokenizer, g), dtype=torch.long) for g in grids
            ]
            self._check_expansions(expansions, tiles, grids)
        # [L] -> [L + Σ(n_k - 1)]: placeholder k repeats tiles_k · tokens_per_tile times (spatial_unpad: its
        # image's count; an image prompt: its expansion's length), in image order; an audio placeholder
        # tokens_per_audio times
        repeats = torch.ones_like(ids)
        lengths = [len(e) for e in expansions] if expansions else self._slot_counts(tiles, sizes)
        repeats[is_image] = torch.tensor(lengths, dtype=torch.long)
        repeats[is_audio] = self.tokens_per_audio
        ids, labels = ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)
        is_media = (is_image | is_audio).repeat_interleave(repeats)  # every position an image or clip fills
        if expansions:
            ids[is_image.repeat_interleave(repeats)] = torch.cat(expansions)
        labels[is_media] = IGNORE_INDEX
        return ids, labels, is_media

    def _check_expansions(
        self, expansions: list[torch.Tensor], tiles: list[int], grids: list[tuple[int, int]]
    ) -> None:
        # a prompt whose slots hold another token than its placeholder names it (Gemma 3: <image_soft_token>)
        slot_token = getattr(self.image_prompt, "slot_token", self.image_token)
        slot_id = self.tokenizer.token_to_id(slot_token)
        for expansion, n, grid in zip(expansions, tiles, grids, strict=True):
            found = int((expansion == slot_id).sum())
            expected = self.image_prompt.image_tokens(grid, n, self.tokens_per_tile)
            if found != expected:
                raise InputError(
                    f"image_prompt: an image of {n} view(s) expands to {found} {slot_token} tokens; "
                    f"the model fills {expected}"
                )

    def _slot_counts(self, tiles: list[int], sizes: list[tuple[int, int]]) -> list[int]:
        """Return the image tokens each image gets: its tiles × tokens_per_tile, or its spatial_unpad count."""
        if self.spatial_unpad is None:
            return [n * self.tokens_per_tile for n in tiles]
        return [self.spatial_unpad.num_tokens(*size) for size in sizes]

    def _images(
        self, images: Sequence[ImageSource]
    ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, int]], list[tuple[int, int]], list[int]]:
        # a list or tuple of images is one slot's video frames: all preprocessed, never tiled
        if not images:
            return None, [], [], [], []
        views, tiles, grids, sizes, frames = [], [], [], [], []
        for source in images:
            group = list(source) if isinstance(source, list | tuple) else None
            if group is not None:
                if self.spatial_unpad is not None:
                    raise InputError(
                        "videos: a LLaVA-NeXT (spatial_unpad) model reads images, not video frames"
                    )
                if not group:
                    raise InputError("images: an empty frame group; a video slot needs at least one frame")
                loaded = [load_image(frame, self.image_processor.max_pixels) for frame in group]
                views.extend(loaded)
                tiles.append(1)
                grids.append((0, 0))
                sizes.append((loaded[0].height, loaded[0].width))
                frames.append(len(loaded))
                continue
            image = load_image(source, self.image_processor.max_pixels)  # InputError on a 0-pixel side
            sizes.append((image.height, image.width))
            if self.dynamic_resolution is None:
                views.append(image)
                tiles.append(1)
                grids.append((0, 0))
                frames.append(1)
            else:
                tiled = self.dynamic_resolution(image)
                views.extend(tiled.tiles)
                tiles.append(len(tiled.tiles))
                grids.append(tiled.grid)
                frames.extend([1] * len(tiled.tiles))
        pixels = self.image_processor.uint8(views) if self.uint8_pixels else self.image_processor(views)
        return pixels, tiles, grids, sizes, frames

    def collate(
        self, samples: Sequence[EncodedSample | None], padding_side: PaddingSide = "right"
    ) -> dict[str, Any]:
        """Return a padded batch of samples (right for training, left for generation); None samples are counted.

        Keys: input_ids, attention_mask, labels [B, L] long; pixel_values [T, 3, H, W] float32 (or uint8) or None;
        image_tiles [I], image_grid [I, 2], image_sizes [I, 2], images_per_sample [B] long; image_frames [S]
        long (pixel_values rows per image slot); audio_features
        [A, n_mels, frames] float32 or None, audio_per_sample [B] long; num_dropped int.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side: got {padding_side!r}; expected 'left' or 'right'")
        kept = [s for s in samples if s is not None]
        input_ids = pad_rows([s.input_ids for s in kept], self.pad_token_id, padding_side)
        labels = pad_rows([s.labels for s in kept], IGNORE_INDEX, padding_side)
        attention_mask = pad_rows([torch.ones_like(s.input_ids) for s in kept], 0, padding_side)
        pixels = [s.pixel_values for s in kept if s.pixel_values is not None]
        if len({p.shape[1:] for p in pixels}) > 1:
            raise InputError(
                "pixel_values: tiles differ in size across the batch; use a fixed-size image processor"
            )
        audio = [s.audio_features for s in kept if s.audio_features is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_tiles": torch.tensor([t for s in kept for t in s.image_tiles], dtype=torch.long),
            "image_grid": torch.tensor([g for s in kept for g in s.image_grids], dtype=torch.long).reshape(
                -1, 2
            ),
            "image_sizes": torch.tensor([z for s in kept for z in s.image_sizes], dtype=torch.long).reshape(
                -1, 2
            ),
            "images_per_sample": torch.tensor([len(s.image_tiles) for s in kept], dtype=torch.long),
            "image_frames": torch.tensor([f for s in kept for f in s.image_frames], dtype=torch.long),
            "audio_features": torch.cat(audio) if audio else None,
            "audio_per_sample": torch.tensor(
                [0 if s.audio_features is None else len(s.audio_features) for s in kept], dtype=torch.long
            ),
            "num_dropped": len(samples) - len(kept),
        }

    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | None = None,
        *,
        add_generation_prompt: bool = True,
        padding_side: PaddingSide = "left",
        audio: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
        sampling_rate: int | None = None,
        videos: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
        num_frames: int = 8,
        video_fps: float | None = None,
        video_pool: int = 1,
    ) -> dict[str, Any]:
        """Return a generation batch for one prompt (with its images, audio clips and videos) or a list of prompts
        (with a list of each per prompt); see `encode` for the video options."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], Mapping))
        if single:
            prompts = [prompts]
            images, audio = [images] if images is not None else None, [audio] if audio is not None else None
            if videos is not None:  # one video may be given bare, not in a list
                videos = [[videos] if isinstance(videos, (str, Path, bytes)) else list(videos)]
        for what, lists in (("images", images), ("audio", audio), ("videos", videos)):
            if lists is not None and len(lists) != len(prompts):
                raise InputError(f"{what}: got {len(lists)} lists for {len(prompts)} prompts")
        video_options = dict(num_frames=num_frames, video_fps=video_fps, video_pool=video_pool)
        samples = [
            self.encode(p, images[i] if images is not None else None, add_generation_prompt=add_generation_prompt,
                        audio=audio[i] if audio is not None else None, sampling_rate=sampling_rate,
                        videos=videos[i] if videos is not None else None, **video_options)
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        if any(s is None for s in samples):
            raise InputError(
                f"max_length: a prompt's image or audio tokens do not fit in {self.max_length} tokens"
            )
        return self.collate(samples, padding_side)
