"""Where a checkpoint folder keeps its image processor's settings, whichever transformers wrote it.

transformers 4.x (and most hub repositories) write the image processor to preprocessor_config.json.
transformers 5.x's `ProcessorMixin.save_pretrained` writes one processor_config.json instead, with the image
processor's settings nested under "image_processor" beside the processor's own keys (patch_size,
num_additional_image_tokens, ...). Every loader reads them through `image_processor_settings`, so a folder
in either layout loads the same way.
"""

from pathlib import Path
from typing import Any

from mmlm.errors import InputError
from mmlm.json_files import read_json_object

PREPROCESSOR = "preprocessor_config.json"
PROCESSOR = "processor_config.json"


def processor_settings(folder: Path) -> dict[str, Any]:
    """Return processor_config.json's top-level keys (the processor's own settings), or {} without one."""
    path = folder / PROCESSOR
    return read_json_object(path) if path.is_file() else {}


def image_processor_settings(folder: Path, required: bool = True) -> dict[str, Any] | None:
    """Return the image processor's settings: preprocessor_config.json, else processor_config.json's nested
    "image_processor"; None (or one-line InputError when `required`) when the folder has neither."""
    if (folder / PREPROCESSOR).is_file():
        return read_json_object(folder / PREPROCESSOR)
    nested = processor_settings(folder).get("image_processor")
    if isinstance(nested, dict):
        return nested
    if (folder / PROCESSOR).is_file() and nested is not None:
        raise InputError(
            f"{folder / PROCESSOR}: image_processor: expected an object, got {type(nested).__name__}"
        )
    if required:
        raise InputError(
            f"{folder}: no image processor settings: expected {PREPROCESSOR}, or {PROCESSOR} with an "
            f'"image_processor" object'
        )
    return None


def _count_setting(settings: dict[str, Any], key: str, default: int, path: Path) -> int:
    value = settings.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{path}: {key}: got {value!r}; expected a non-negative integer")
    return value


def llava_image_tokens(folder: Path, image_size: tuple[int, int] | None) -> tuple[int, str] | None:
    """Return how many image tokens processor_config.json expands one `image_size` (height, width) image into,
    with the settings that say so, or None when the folder's processor fixes no count."""
    path, settings = folder / PROCESSOR, processor_settings(folder)
    if "image_seq_length" in settings:  # processors that store the count itself (PaliGemma, Gemma 3, ...)
        return _count_setting(settings, "image_seq_length", 0, path), "image_seq_length"
    if settings.get("patch_size") is None or image_size is None:
        return None  # no patch_size: transformers' LlavaProcessor leaves <image> unexpanded; no fixed size: varies
    patch = _count_setting(settings, "patch_size", 0, path)
    if patch == 0:
        raise InputError(f"{path}: patch_size: got 0; expected a positive integer")
    extra = _count_setting(settings, "num_additional_image_tokens", 0, path)
    select = settings.get("vision_feature_select_strategy")
    # transformers' LlavaProcessor.replace_image_token: the patch grid, plus class tokens, minus one for "default"
    count = (image_size[0] // patch) * (image_size[1] // patch) + extra - (select == "default")
    how = (
        f"patch_size {patch} on {image_size[0]}x{image_size[1]} pixels, num_additional_image_tokens {extra}, "
        f"vision_feature_select_strategy {select!r}"
    )
    return count, how


def check_image_tokens(folder: Path, model_tokens: int, image_size: tuple[int, int] | None) -> None:
    """Raise a one-line InputError when processor_config.json expands an image into a different number of
    tokens than the model (config.json) gives it features."""
    said = llava_image_tokens(folder, image_size)
    if said is not None and said[0] != model_tokens:
        raise InputError(
            f"{folder / PROCESSOR}: the processor expands an image into {said[0]} tokens ({said[1]}) but "
            f"{folder / 'config.json'} gives {model_tokens} image features per image; expected them equal"
        )


def llava_processor_config(
    patch_size: int, select: str, image_tokens: int, image_size: tuple[int, int], image_token: str
) -> dict[str, Any]:
    """Return the processor_config.json transformers' LlavaProcessor needs to expand one image into
    `image_tokens` tokens (without patch_size it cannot expand <image> at all)."""
    grid = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    return {
        "processor_class": "LlavaProcessor",
        "image_token": image_token,
        "patch_size": patch_size,
        "vision_feature_select_strategy": select,
        # what the grid and the selection leave unexplained: CLIP's class token
        "num_additional_image_tokens": image_tokens - grid + (select == "default"),
    }
