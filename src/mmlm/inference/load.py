"""`mmlm.load`: one entry point for transformers folders and mmlm's own, dispatched on config.json alone.

Each architecture entry knows how to build its loaded object: a ContrastiveModel (CLIP, SigLIP) or a CausalLM
(Llama, Mistral, Qwen2). A name like "org/model" that is not a folder is a hub id: its snapshot in the Hugging
Face cache, downloaded when missing and the network allows (mmlm.checkpoints.hub).
"""

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmlm.checkpoints import open_clip
from mmlm.checkpoints.hub import resolve_folder
from mmlm.checkpoints.manifest import verify_manifest
from mmlm.checkpoints.mmlm_format import mmlm_architecture
from mmlm.errors import InputError
from mmlm.inference.audio import AudioModel, load_hf_whisper, load_mmlm_audio
from mmlm.inference.causal_lm import CausalLM, load_hf_causal_lm, load_mmlm_causal_lm
from mmlm.inference.chameleon import load_chameleon
from mmlm.inference.contrastive import (
    ContrastiveModel,
    load_hf_dual_encoder,
    load_mmlm_dual_encoder,
    load_open_clip,
)
from mmlm.inference.gemma3 import load_gemma3, load_gemma3_text
from mmlm.inference.idefics import load_idefics
from mmlm.inference.qwen2_vl import load_qwen2_vl
from mmlm.inference.vlm import GenerativeModel, load_blip2, load_idefics3, load_llava, load_mmlm_vlm
from mmlm.json_files import read_json_object
from mmlm.models.config import DTYPE_NAMES

Loaded = ContrastiveModel | CausalLM | GenerativeModel | AudioModel
# folder, its config.json, device, dtype -> the loaded object
Loader = Callable[[Path, dict[str, Any], torch.device, torch.dtype], Loaded]


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
    """One transformers model_type: the model classes it covers and the function that loads such a folder."""

    classes: tuple[str, ...]
    load: Loader


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Return the torch dtype a name such as "bf16" or "float32" means (None: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[dtype])


def parse_device(device: str | torch.device) -> torch.device:
    """Return the torch device a name such as "cpu" or "cuda:1" means, if this machine has it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} requested but no CUDA GPU is available")
    return device


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> Loaded:
    """Return the model in a transformers-format folder (CLIP, SigLIP, Llama, Mistral, Qwen2), a hub id such as
    "org/name" (at `revision`: a branch, tag or commit), or an mmlm checkpoint folder."""
    folder = resolve_folder(path, revision)
    dtype, device = parse_dtype(dtype), parse_device(device)
    verify_manifest(
        folder
    )  # a training checkpoint's files are checked before any is read; other folders have none
    if not (folder / "config.json").is_file() and (folder / open_clip.CONFIG_NAME).is_file():
        return load_open_clip(folder, device, dtype)
    cfg_json = read_json_object(folder / "config.json")
    if "mmlm_version" in cfg_json:
        loader = MMLM_ARCHITECTURES.get(mmlm_architecture(cfg_json))
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


HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "clip": HFArchitecture(("CLIPModel",), functools.partial(load_hf_dual_encoder, "clip")),
    "siglip": HFArchitecture(("SiglipModel",), functools.partial(load_hf_dual_encoder, "siglip")),
    "siglip2": HFArchitecture(("Siglip2Model",), functools.partial(load_hf_dual_encoder, "siglip2")),
    "llama": HFArchitecture(("LlamaForCausalLM",), load_hf_causal_lm),
    "mistral": HFArchitecture(("MistralForCausalLM",), load_hf_causal_lm),
    "qwen2": HFArchitecture(("Qwen2ForCausalLM",), load_hf_causal_lm),
    "llava": HFArchitecture(("LlavaForConditionalGeneration",), load_llava),
    "idefics3": HFArchitecture(("Idefics3ForConditionalGeneration",), load_idefics3),
    "smolvlm": HFArchitecture(("SmolVLMForConditionalGeneration",), load_idefics3),
    "llava_next": HFArchitecture(("LlavaNextForConditionalGeneration",), load_llava),
    "qwen2_vl": HFArchitecture(("Qwen2VLForConditionalGeneration",), load_qwen2_vl),
    "qwen2_5_vl": HFArchitecture(("Qwen2_5_VLForConditionalGeneration",), load_qwen2_vl),
    "blip-2": HFArchitecture(("Blip2ForConditionalGeneration",), load_blip2),
    "idefics": HFArchitecture(("IdeficsForVisionText2Text",), load_idefics),
    "chameleon": HFArchitecture(("ChameleonForConditionalGeneration",), load_chameleon),
    "gemma3": HFArchitecture(("Gemma3ForConditionalGeneration",), load_gemma3),
    "gemma3_text": HFArchitecture(("Gemma3ForCausalLM",), load_gemma3_text),
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
