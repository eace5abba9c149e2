"""`mmlm.load`: one entry point for transformers folders and mmlm's own, dispatched on config.json alone.

Each architecture entry knows how to build its loaded object: a ContrastiveModel (CLIP, SigLIP) or a CausalLM
(Llama, Mistral, Qwen2). A name like "org/model" that is not a folder is looked up in the local Hugging Face
cache; nothing is ever downloaded.
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoints import open_clip
from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_clip import (
    clip_config_from_hf,
    clip_key_map,
    config_to_hf,
    siglip_config_from_hf,
    siglip_key_map,
)
from mmlm.checkpoints.keymap import Rule, to_theirs
from mmlm.checkpoints.safetensors_io import read_weights, write_weights
from mmlm.errors import InputError
from mmlm.inference.audio import (
    AudioModel,
    load_hf_whisper,
    load_mmlm_audio,
    read_preprocessor,
    whisper_preprocessor,
)
from mmlm.inference.causal_lm import CausalLM, load_hf_causal_lm, load_mmlm_causal_lm
from mmlm.inference.contrastive import ContrastiveModel
from mmlm.inference.vlm import GenerativeModel, load_llava, load_mmlm_vlm
from mmlm.json_files import read_json_object
from mmlm.models.config import config_from_dict
from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
from mmlm.processing.image import ImageProcessor
from mmlm.processing.tokenizer import load_tokenizer

MMLM_VERSION = 1
Loaded = ContrastiveModel | CausalLM | GenerativeModel | AudioModel
# folder, its config.json, device, dtype -> the loaded object
Loader = Callable[[Path, dict[str, Any], torch.device, torch.dtype], Loaded]


@dataclasses.dataclass(frozen=True)
class DualEncoderFormat:
    """How a transformers dual encoder's config and tensors translate to ours (used to load and to export)."""

    config_from_hf: Callable[[dict[str, Any]], DualEncoderConfig]
    key_map: Callable[[DualEncoderConfig], list[Rule]]


DUAL_ENCODER_FORMATS = {
    "clip": DualEncoderFormat(clip_config_from_hf, clip_key_map),
    "siglip": DualEncoderFormat(siglip_config_from_hf, siglip_key_map),
}


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
    """One transformers model_type: the model classes it covers and the function that loads such a folder."""

    classes: tuple[str, ...]
    load: Loader


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} requested but no CUDA GPU is available")
    return device


def hub_cache() -> Path:
    """Return the local Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_folder(path: str | Path) -> Path:
    """Return the model folder `path` names: a folder, or the cached snapshot of a hub id such as "org/name"."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if not (isinstance(path, str) and HUB_ID.fullmatch(path)):
        raise InputError(f"model folder {folder} not found")
    repo = hub_cache() / ("models--" + path.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    if len(snapshots) == 1:  # no refs/main (e.g. fetched at a revision): the only snapshot there is
        return snapshots[0]
    raise InputError(
        f"model folder {path} not found, and {path} is not in the Hugging Face cache ({repo}); mmlm never "
        f"downloads: fetch it first (huggingface-cli download {path}) or pass a folder"
    )


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> Loaded:
    """Return the model in a transformers-format folder (CLIP, SigLIP, Llama, Mistral, Qwen2), a cached hub id,
    or an mmlm checkpoint folder."""
    folder = resolve_folder(path)
    dtype, device = _parse_dtype(dtype), _parse_device(device)
    if not (folder / "config.json").is_file() and (folder / open_clip.CONFIG_NAME).is_file():
        return load_open_clip(folder, device, dtype)
    cfg_json = read_json_object(folder / "config.json")
    if "mmlm_version" in cfg_json:
        loader = MMLM_ARCHITECTURES.get(cfg_json.get("architecture"))
        if loader is None:
            raise InputError(f"{folder}: unknown mmlm architecture {cfg_json.get('architecture')!r}")
        return loader(folder, cfg_json, device, dtype)
    arch = HF_ARCHITECTURES.get(cfg_json.get("model_type"))
    if arch is None:
        known = ", ".join(sorted(HF_ARCHITECTURES))
        raise InputError(
            f"{folder}: model_type {cfg_json.get('model_type')!r} is not supported (mmlm reads {known})"
        )
    names = cfg_json.get("architectures") or list(arch.classes)
    if not set(names) & set(arch.classes):
        raise InputError(
            f"{folder}: architectures {names} are not supported; expected one of {list(arch.classes)}"
        )
    return arch.load(folder, cfg_json, device, dtype)


def load_hf_dual_encoder(
    family: str, folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ContrastiveModel:
    """Return a transformers CLIPModel or SiglipModel folder as a ContrastiveModel."""
    fmt = DUAL_ENCODER_FORMATS[family]
    cfg = fmt.config_from_hf(cfg_json)
    model = build_from_weights(
        lambda: DualEncoder(cfg), read_weights(folder), fmt.key_map(cfg), str(folder), device, dtype
    )
    pre = folder / "preprocessor_config.json"
    processor = ImageProcessor.from_hf(read_json_object(pre)) if pre.is_file() else default_processor(cfg)
    tokenizer = load_tokenizer(folder, cfg.text.context_length, cfg.text.padding)
    return ContrastiveModel(model, tokenizer, processor)


def load_mmlm_dual_encoder(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ContrastiveModel:
    """Return an mmlm dual_encoder folder (image-text or audio-text) as a ContrastiveModel."""
    cfg = config_from_dict(DualEncoderConfig, cfg_json["config"])
    weights = read_weights(folder)
    model = build_from_weights(
        lambda: DualEncoder(cfg), weights, identity_key_map(weights), str(folder), device, dtype
    )
    tokenizer = load_tokenizer(folder, cfg.text.context_length, cfg.text.padding)
    if cfg.audio is not None:
        return ContrastiveModel(model, tokenizer, None, read_preprocessor(folder, cfg.audio))
    processor = ImageProcessor.from_hf(read_json_object(folder / "preprocessor_config.json"))
    return ContrastiveModel(model, tokenizer, processor)


HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "clip": HFArchitecture(("CLIPModel",), functools.partial(load_hf_dual_encoder, "clip")),
    "siglip": HFArchitecture(("SiglipModel",), functools.partial(load_hf_dual_encoder, "siglip")),
    "llama": HFArchitecture(("LlamaForCausalLM",), load_hf_causal_lm),
    "mistral": HFArchitecture(("MistralForCausalLM",), load_hf_causal_lm),
    "qwen2": HFArchitecture(("Qwen2ForCausalLM",), load_hf_causal_lm),
    "llava": HFArchitecture(("LlavaForConditionalGeneration",), load_llava),
    # the encoder alone: a Whisper folder loads as an AudioModel (encoder states), the decoder is not read
    "whisper": HFArchitecture(
        ("WhisperModel", "WhisperForConditionalGeneration", "WhisperEncoder"), load_hf_whisper
    ),
}
MMLM_ARCHITECTURES: dict[str, Loader] = {
    "dual_encoder": load_mmlm_dual_encoder,
    "decoder_lm": load_mmlm_causal_lm,
    "vlm": load_mmlm_vlm,
    "audio_encoder": load_mmlm_audio,
}


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


def default_processor(cfg: DualEncoderConfig) -> ImageProcessor:
    """Return the family's standard preprocessing at the model's resolution."""
    size = cfg.vision.image_size
    return ImageProcessor.siglip(size) if cfg.family == "siglip" else ImageProcessor.clip(size)


def identity_key_map(weights: dict[str, torch.Tensor]) -> list[Rule]:
    """Return rules that keep every name as it is (mmlm's own folders store our names)."""
    return [Rule((k,), (k,)) for k in weights]


def hf_family(cfg: DualEncoderConfig) -> str | None:
    """Return the transformers model_type that represents `cfg` exactly, or None if none does."""
    fmt = DUAL_ENCODER_FORMATS.get(cfg.family)
    if fmt is None or cfg.audio is not None:  # transformers' ClapModel has an HTSAT tower, not Whisper's
        return None
    back = fmt.config_from_hf(config_to_hf(cfg))
    same = dataclasses.replace(back, logit_scale_init=cfg.logit_scale_init, logit_bias_init=cfg.logit_bias_init,
                               logit_scale_max=cfg.logit_scale_max)  # fmt: skip
    return cfg.family if same == cfg else None


def save(loaded: ContrastiveModel, folder: Path, format: str = "auto") -> Path:
    """Write a contrastive model to `folder`: transformers format where it can represent the model (`auto`),
    else mmlm's."""
    if format not in ("auto", "mmlm"):
        raise InputError(f"unknown save format {format!r}; expected 'auto' or 'mmlm'")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = loaded.config
    state = {k: v.float() for k, v in loaded.model.state_dict().items()}
    family = hf_family(cfg) if format == "auto" else None
    if family is not None:
        config = config_to_hf(cfg)
        write_weights(
            to_theirs(state, DUAL_ENCODER_FORMATS[family].key_map(cfg)), folder / "model.safetensors"
        )
    else:
        config = {
            "mmlm_version": MMLM_VERSION,
            "architecture": "dual_encoder",
            "config": dataclasses.asdict(cfg),
        }
        write_weights(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if cfg.audio is not None:
        preprocessor = loaded.audio_preprocessor or whisper_preprocessor(cfg.audio)
    else:
        preprocessor = loaded.image_processor.to_hf()
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    loaded.tokenizer.save(folder)
    return folder
