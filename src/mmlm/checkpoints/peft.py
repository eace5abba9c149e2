"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors) <-> LoRA on mmlm models.

PEFT names each tensor after the transformers module it adapts:
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. A module name map turns
mmlm's LoRA names (layers/lora.py; fused q/k/v slices named `blocks.0.attn.q` ...) into those modules;
`llama_module_names` is the one for DecoderLM, with prefixes for an LM inside a VLM.

PEFT is a dev dependency and the reference: tests/test_peft_parity.py loads adapters written here with
PeftModel.from_pretrained on transformers' LLaVA and checks that PEFT wraps exactly the adapted modules and gives
mmlm's logits (fp32, 1e-5), over ranks, alphas, targets (fused q/k/v slices among them) and rsLoRA.
"""

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mmlm.checkpoints.safetensors_io import write_weights
from mmlm.errors import InputError
from mmlm.json_files import read_json_object
from mmlm.layers.lora import LoRALinear, add_lora, fused_slices, lora_units

ModuleNames = Callable[[str], str | None] | Mapping[str, str]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# DecoderLM names inside blocks.{i} -> transformers Llama/Mistral/Qwen2 names inside layers.{i}
LLAMA_LAYER_NAMES = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.out": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}


def llama_module_names(
    ours_prefix: str = "", theirs_prefix: str = "model.", head: str | None = "lm_head"
) -> Callable[[str], str | None]:
    """Return a map from DecoderLM LoRA names to transformers Llama module names (None where there is none).

    For an LM inside a VLM add the prefixes: ours_prefix="lm." with theirs_prefix="model.language_model."
    (transformers ≥ 4.52 LLaVA) or "language_model.model." (older LLaVA); `head` is the LM head's module name
    ("lm_head", or "language_model.lm_head" for older LLaVA). The fused `attn.qkv` itself has no counterpart:
    adapt its `q`, `k`, `v` slices instead.
    """
    layer = re.compile(rf"{re.escape(ours_prefix)}blocks\.(\d+)\.(.+)")

    def names(ours: str) -> str | None:
        if head is not None and ours == f"{ours_prefix}lm_head":
            return head
        match = layer.fullmatch(ours)
        if match is None or match[2] not in LLAMA_LAYER_NAMES:
            return None
        return f"{theirs_prefix}layers.{match[1]}.{LLAMA_LAYER_NAMES[match[2]]}"

    return names


def _lookup(module_names: ModuleNames) -> Callable[[str], str | None]:
    return module_names.get if isinstance(module_names, Mapping) else module_names


def _target_modules(model: nn.Module, names: Callable[[str], str | None], adapted: list[str]) -> list[str]:
    # PEFT adapts every module whose name ends in a listed name. Short names ("q_proj") are exact only when
    # the map names all of the model's linear layers (no unseen vision tower with its own q_proj) and every
    # mapped module with such a short name is adapted; otherwise list the full module names.
    units = lora_units(model)
    theirs = {unit: names(unit) for unit, _, _ in units}
    leaves = {h.rpartition(".")[2] for h in adapted}
    covered = {module for unit, module, _ in units if theirs[unit] is not None}
    every_layer_mapped = covered == {module for _, module, _ in units}
    same_leaf = {h for h in theirs.values() if h is not None and h.rpartition(".")[2] in leaves}
    return sorted(leaves) if every_layer_mapped and same_leaf == set(adapted) else sorted(adapted)


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    module_names: ModuleNames,
    base_model_name_or_path: str | None = None,
    target_modules: list[str] | str | None = None,
) -> list[str]:
    """Write the model's LoRA as a PEFT adapter folder; return the transformers module names it adapts.

    `module_names` maps each LoRA name (module name, or `...attn.q` for a fused slice) to a transformers module
    name. `target_modules` overrides the adapter_config.json entry PEFT uses to decide what to wrap.
    """
    names = _lookup(module_names)
    loras = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not loras:
        raise InputError("save_adapter: the model has no LoRA layers; call apply_lora first")
    settings = {(m.rank, m.alpha, m.dropout, m.rslora) for _, m in loras}
    if len(settings) > 1:
        raise InputError(
            f"save_adapter: PEFT needs one (rank, alpha, dropout, rslora); the model has {settings}"
        )
    rank, alpha, dropout, rslora = settings.pop()
    tensors: dict[str, torch.Tensor] = {}
    adapted = []
    for name, lora in loras:
        parent = name.rpartition(".")[0]
        for part, a, b in lora.pairs():
            unit = name if part is None else (f"{parent}.{part}" if parent else part)
            theirs = names(unit)
            if theirs is None:
                raise InputError(f"save_adapter: the module name map has no transformers name for {unit!r}")
            tensors[f"{PEFT_PREFIX}{theirs}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{theirs}.lora_B.weight"] = b
            adapted.append(theirs)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules or _target_modules(model, names, adapted),
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_weights(tensors, folder / WEIGHTS_FILE)
    return adapted


def read_adapter_config(folder: Path) -> dict:
    """Return adapter_config.json of a PEFT LoRA folder, refusing settings mmlm's LoRA does not implement."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{folder}: no {CONFIG_FILE}; not a PEFT adapter folder")
    config = read_json_object(path)
    if config.get("peft_type") != "LORA":
        raise InputError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise InputError(f"{path}: 'r' must be a positive integer, got {config.get('r')!r}")
    for field, default in (("lora_alpha", None), ("lora_dropout", 0.0)):
        if not isinstance(config.get(field, default), int | float):
            raise InputError(f"{path}: {field!r} must be a number, got {config.get(field)!r}")
    unsupported = {
        "bias": config.get("bias", "none") != "none",
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    for field, used in unsupported.items():
        if used:
            raise InputError(f"{path}: {field}={config[field]!r} is not supported by mmlm's LoRA")
    return config


def _slice_rows(model: nn.Module, module: str, part: str) -> tuple[int, int]:
    parent, _, child = module.rpartition(".")
    return fused_slices(model.get_submodule(parent), child)[part]


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file() and (folder / "adapter_model.bin").is_file():
        raise InputError(
            f"{folder}: only adapter_model.bin found; mmlm reads safetensors only, since unpickling can run code"
        )
    if not path.is_file():
        raise InputError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def load_adapter(model: nn.Module, folder: str | Path, module_names: ModuleNames) -> list[str]:
    """Add the LoRA of a PEFT adapter folder to `model` (base weights frozen); return the wrapped module names."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = _read_tensors(folder)
    source, rank = folder / WEIGHTS_FILE, config["r"]
    names = _lookup(module_names)
    ours = {}  # transformers module name -> (our module, slice or None)
    for unit, module, part in lora_units(model):
        theirs = names(unit)
        if theirs is not None:
            ours[theirs] = (module, part)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise InputError(f"{source}: tensor {key!r} is not a LoRA A/B weight mmlm can load")
        if match[1] not in ours:
            raise InputError(f"{source}: tensor {key!r} adapts {match[1]!r}, which has no place in the model")
        found.setdefault(match[1], {})[match[2]] = tensor
    plan: dict[str, list[str] | None] = {}
    for theirs, (module, part) in ours.items():  # in the model's order
        if theirs not in found:
            continue
        pair = found[theirs]
        base = model.get_submodule(module)
        start, end = (0, base.out_features) if part is None else _slice_rows(model, module, part)
        expected = {"A": (rank, base.in_features), "B": (end - start, rank)}
        for which, shape in expected.items():
            if which not in pair:
                raise InputError(f"{source}: {theirs!r} has no lora_{which}.weight")
            if tuple(pair[which].shape) != shape:
                raise InputError(
                    f"{source}: {theirs}.lora_{which}.weight has shape {list(pair[which].shape)}, "
                    f"expected {list(shape)}"
                )
        if module in plan and (part is None) != (plan[module] is None):
            raise InputError(f"{source}: {module!r} is adapted both whole and by slices")
        plan[module] = None if part is None else [*(plan.get(module) or []), part]
    dropout, rslora = config.get("lora_dropout", 0.0), bool(config.get("use_rslora", False))
    wrapped = add_lora(model, plan, rank, config["lora_alpha"], dropout, rslora)
    theirs_of = {where: theirs for theirs, where in ours.items()}
    with torch.no_grad():
        for module in wrapped:
            for part, a, b in model.get_submodule(module).pairs():
                pair = found[theirs_of[(module, part)]]
                a.copy_(pair["A"])
                b.copy_(pair["B"])
    return wrapped
