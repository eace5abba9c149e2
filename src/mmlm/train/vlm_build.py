"""Building a VLM training run's tokenizer and model (`mmlm train vlm`): the tower, LM and audio encoder from their
folders or configs, a fresh connector, and the processor that reserves their tokens."""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

import mmlm
from mmlm.data.synthetic.instructions import make_instruction
from mmlm.data.synthetic.shapes import World
from mmlm.errors import InputError
from mmlm.eval.vqa import answer_questions, vqa_scores
from mmlm.fusion import fusion_style
from mmlm.inference.audio import AudioModel, whisper_preprocessor
from mmlm.inference.contrastive import ContrastiveModel
from mmlm.inference.vlm import GenerativeModel
from mmlm.models.audio_encoder import AudioConfig, AudioEncoder
from mmlm.models.vlm import VisionLanguageModel, VLMConfig
from mmlm.processing.bpe import BOS, train_bpe
from mmlm.processing.chat import AUDIO_TOKEN, ChatTemplate, special_tokens_of
from mmlm.processing.image import ImageProcessor, PixelNormalize
from mmlm.processing.vlm_processor import VLMProcessor, add_image_token
from mmlm.train.mixed_batches import MixedBatches
from mmlm.train.vlm_config import VLMTrainConfig


def build_tokenizer(cfg: VLMTrainConfig, run_dir: Path, corpus: Callable[[], list[str]]) -> Path:
    """Return the folder of the run's tokenizer: the LM's, the configured one, or a BPE trained on the data.

    A trained BPE puts bos before every text and nothing after it (a prompt must not end in eos).
    """
    source = cfg.model.vlm_init or cfg.model.lm_init or cfg.model.tokenizer
    if source is not None:
        return Path(source)
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():  # a resumed run keeps its tokenizer
        return folder
    return train_bpe(corpus(), folder, cfg.model.vocab_size, cfg.max_length, template=f"{BOS} $A")


def audio_encoder_of(folder: str) -> tuple[AudioConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Return (config, encoder weights, preprocessor) of the audio encoder in a Whisper folder or in an audio-text
    contrastive model's folder (its tower without the pooling and projection), as `vision_init` takes a CLIP's."""

    loaded = mmlm.load(folder)
    if isinstance(loaded, AudioModel):
        return loaded.config, loaded.model.state_dict(), loaded.preprocessor
    if isinstance(loaded, ContrastiveModel) and loaded.config.audio is not None:
        encoder = AudioEncoder(loaded.config.audio).state_dict()
        weights = {k: v for k, v in loaded.model.audio.state_dict().items() if k in encoder}
        return loaded.config.audio, weights, loaded.audio_preprocessor
    raise InputError(
        f"model.audio_init: {folder} is not an audio encoder (a Whisper or audio-text model folder)"
    )


def vlm_of(folder: str) -> GenerativeModel:
    """Return the VLM in `folder` (`model.vlm_init`), or raise a one-line error if it holds another kind."""
    loaded = mmlm.load(folder)
    if not isinstance(loaded, GenerativeModel) or not isinstance(loaded.model, VisionLanguageModel):
        raise InputError(f"model.vlm_init: {folder} is not a vision-language model folder mmlm trains")
    return loaded


def build_vlm(cfg: VLMTrainConfig, tokenizer_folder: Path) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Return a VLM (ViT and LM from their folders, or fresh; or all from a VLM folder) and its processor; the
    connector is new unless a VLM folder with the same connector config gives it."""

    parts = cfg.model
    base = vlm_of(parts.vlm_init) if parts.vlm_init is not None else None
    tokenizer = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    image_token_id = add_image_token(tokenizer)  # may lie past the LM's vocabulary: its slots are overwritten
    with_audio = parts.audio_init is not None or parts.audio is not None
    audio_token_id = add_image_token(tokenizer, AUDIO_TOKEN) if with_audio else None
    specials = special_tokens_of(tokenizer_folder)
    if base is not None:
        vision_cfg, image_processor = base.config.vision, base.processor.image_processor
    elif parts.vision_init is not None:
        tower = mmlm.load(parts.vision_init)
        vision_cfg, image_processor = replace(tower.config.vision, embed_dim=None), tower.image_processor
    else:
        vision_cfg = replace(parts.vision, embed_dim=None)
        image_processor = ImageProcessor.clip(vision_cfg.image_size)
    codes = fusion_style(parts.connector.kind).extra_vocab(parts.connector)  # unified: its image codes
    if base is not None:
        own = fusion_style(base.config.connector.kind).extra_vocab(base.config.connector)  # codes it has
        lm_cfg = replace(base.config.lm, vocab_size=base.config.lm.vocab_size - own + codes)
        if lm_cfg.positions == "rope":  # rotary positions extend to a longer run (a video's many slots)
            lm_cfg = replace(lm_cfg, max_positions=max(lm_cfg.max_positions, cfg.max_length))
    elif parts.lm_init is not None:
        lm = mmlm.load(parts.lm_init)
        lm_cfg = replace(lm.model.cfg, vocab_size=lm.model.cfg.vocab_size + codes)
    else:
        ids = {key: tokenizer.token_to_id(specials[key]) if key in specials else None
               for key in ("bos_token", "eos_token", "pad_token")}  # fmt: skip
        # a style's own ids (unified: the image codes) follow the text vocabulary (and the image token)
        text_vocab = (
            tokenizer.get_vocab_size() if not codes else max(tokenizer.get_vocab_size(), image_token_id + 1)
        )
        lm_cfg = replace(parts.lm, vocab_size=text_vocab + codes, bos_token_id=ids["bos_token"],
                         eos_token_ids=[ids["eos_token"]] if ids["eos_token"] is not None else [],
                         pad_token_id=ids["pad_token"], max_positions=cfg.max_length)  # fmt: skip
    layers, select = (base.config.feature_layers, base.config.feature_select) if base is not None else (
        parts.feature_layers, parts.feature_select)  # fmt: skip
    vlm_cfg = VLMConfig(vision_cfg, lm_cfg, parts.connector, image_token_id, list(layers), select,
                        video_pool=parts.video_pool, video_merge=parts.video_merge)  # fmt: skip
    audio_tower = audio_encoder_of(parts.audio_init) if parts.audio_init is not None else None
    if audio_tower is not None or parts.audio is not None:
        vlm_cfg = replace(vlm_cfg, audio=audio_tower[0] if audio_tower is not None else parts.audio,
                          audio_connector=parts.audio_connector, audio_pool=parts.audio_pool,
                          audio_pool_mode=parts.audio_pool_mode, audio_token_id=audio_token_id)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = VisionLanguageModel(vlm_cfg)
    if audio_tower is not None:
        model.audio.load_state_dict(audio_tower[1])
    if base is not None:
        model.vision.load_state_dict(base.model.vision.state_dict())
        if parts.connector == base.config.connector:
            model.connector.load_state_dict(base.model.connector.state_dict())
    elif parts.vision_init is not None:
        ours = model.vision.state_dict()
        model.vision.load_state_dict({k: v for k, v in tower.model.visual.state_dict().items() if k in ours})
    if base is not None or parts.lm_init is not None:
        state = base.model.lm.state_dict() if base is not None else lm.model.state_dict()
        if codes:  # the codes' rows (and head rows) start as initialised, after the LM's own
            for key, value in model.lm.state_dict().items():
                if key in state and state[key].shape != value.shape:
                    state[key] = torch.cat([state[key], value[len(state[key]) :]])
        model.lm.load_state_dict(state)
    audio = {} if vlm_cfg.audio is None else dict(
        tokens_per_audio=model.audio_tokens, audio_config=vlm_cfg.audio,
        audio_preprocessor=audio_tower[2] if audio_tower is not None else whisper_preprocessor(vlm_cfg.audio))  # fmt: skip
    processor = VLMProcessor(tokenizer, image_processor, model.image_tokens,
                             chat_template=ChatTemplate.from_pretrained(tokenizer_folder),
                             max_length=min(cfg.max_length, lm_cfg.max_positions), special_tokens=specials,
                             **audio)  # fmt: skip
    return model, processor


@torch.no_grad()
def patch_feature_sample(model: VisionLanguageModel, batches: MixedBatches, images: int,
                         normalize: PixelNormalize | None = None) -> torch.Tensor:  # fmt: skip
    """Return the patch features [M, Dv] of about `images` training images (M = 0: the batches had none), for
    a fusion style to fit before training (unified tokens: its codebook)."""
    features, seen = [], 0
    for batch, _ in zip(batches, range(10_000), strict=False):
        if batch["pixel_values"] is not None:
            pixels = batch["pixel_values"] if normalize is None else normalize(batch["pixel_values"])
            features.append(model.patch_features(pixels).flatten(0, 1))  # [I·N, Dv]
            seen += len(batch["pixel_values"])
        if seen >= images:
            break
    return torch.cat(features) if features else torch.zeros(0, 0)


def shapes_vqa_evaluator(
    loaded: GenerativeModel, cfg: VLMTrainConfig, pairs: list[tuple[str, str]] | World, split: str = "test"
) -> Callable[[int], dict[str, float]]:
    """Return evaluate(step): VQA accuracy (exact match after normalisation) on shapes questions of `split`."""
    size = loaded.config.vision.image_size
    samples = [make_instruction(i, cfg.seed, split=split, pairs=pairs, image_size=size)
               for i in range(cfg.eval_samples)]  # fmt: skip

    def evaluate(step: int) -> dict[str, float]:
        predictions = answer_questions(loaded, [s.image for s in samples], [s.question for s in samples])
        scores = vqa_scores(predictions, [[s.answer] for s in samples], [s.type for s in samples])
        return {f"vqa_{k}": v for k, v in scores.items()}

    return evaluate
