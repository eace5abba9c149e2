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
