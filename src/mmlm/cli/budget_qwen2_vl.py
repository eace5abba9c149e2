"""`mmlm budget` for Qwen2-VL / Qwen2.5-VL: an image's patch grid at a resolution, its LM tokens and their cost.

The fusion-style comparison of the other families does not apply (the tower reads images at their own size), so
this prints the model's own row only.
"""

import argparse
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmlm.errors import InputError


def qwen2_vl_budget_report(
    args: argparse.Namespace,
    config: dict[str, Any],
    folder: Path | None,
    dtype_bytes: Mapping[str, int],
    flops_unit: Callable[[list[int]], tuple[float, str]],
) -> str:
    """Return the budget of one `--resolution` image as JSON (`--json`) or a table; `dtype_bytes` and `flops_unit`
    are the budget command's (passed in: this module sits below it)."""
    from mmlm.checkpoints.hf_qwen2_vl import qwen2_vl_config_from_hf
    from mmlm.checkpoints.processor_files import image_processor_settings
    from mmlm.models.config import DTYPE_NAMES
    from mmlm.models.qwen2_vl_budget import qwen2_vl_budget
    from mmlm.processing.qwen2_vl_image import qwen2_vl_processing_from_hf

    if args.resolution is None:
        raise InputError(
            "--resolution: Qwen2-VL reads each image at its own size; give HEIGHTxWIDTH in pixels"
        )
    if args.tiles is not None or args.measure or args.frames != 1 or args.video_seconds is not None:
        raise InputError(
            "--tiles, --measure, --frames, --video-seconds: not for Qwen2-VL; give --resolution only"
        )
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", args.resolution)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise InputError(
            f"--resolution: got {args.resolution!r}; expected HEIGHTxWIDTH in pixels, e.g. 480x640"
        )
    settings = (image_processor_settings(folder, required=False) if folder is not None else None) or {}
    resize, _ = qwen2_vl_processing_from_hf(settings)  # no folder: transformers' default pixel range
    cfg = qwen2_vl_config_from_hf(config)
    dtype = DTYPE_NAMES.get(args.dtype, args.dtype) if args.dtype else str(config.get("dtype") or "bfloat16")
    if dtype not in dtype_bytes:
        raise InputError(f"--dtype: got {args.dtype!r}; expected one of {sorted(dtype_bytes)}")
    budget = qwen2_vl_budget(
        cfg, resize.grid(int(match[1]), int(match[2])), args.text_tokens, dtype_bytes[dtype]
    )
    if args.json:
        return json.dumps({"model": config["model_type"], "kv_dtype": dtype, **budget.to_dict()}, indent=2)
    scale, unit = flops_unit([budget.total_flops])
    rows, cols = budget.grid
    lines = [
        f"{config['model_type']}: a {match[1]}x{match[2]} image is resized to {rows * resize.patch_size}x"
        f"{cols * resize.patch_size} px, {rows}x{cols} = {budget.patches} patches",
        f"visual tokens  {budget.visual_tokens} (+ {budget.text_tokens} text tokens)",
        f"vision         {budget.vision_flops / scale:.1f} {unit}",
        f"patch merger   {budget.connector_flops / scale:.1f} {unit}",
        f"LM prefill     {budget.lm_flops / scale:.1f} {unit}",
        f"KV cache       {budget.kv_bytes / 2**20:.2f} MiB ({dtype})",
    ]
    return "\n".join(lines + ([budget.note] if budget.note else []))
