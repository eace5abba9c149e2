"""`mmlm budget`: the visual-token budget of one image, from a model config alone or a model folder.

Reads a transformers config.json (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, CLIP, SigLIP, bare CLIP/SigLIP vision, BLIP-2
with an OPT LM) or mmlm's own (vlm, dual_encoder), prints tokens, FLOPs per stage and KV-cache bytes for the model's
connector and
for every fusion style on the same tower and LM (mmlm/models/budget.py), and with --measure times each stage.
"""

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlm.cli.model_args import add_revision_arg
from mmlm.errors import InputError
from mmlm.models.config import DTYPE_NAMES

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
TEXT_ONLY = ("llama", "mistral", "qwen2", "opt", "decoder_lm")
OPT_DEFAULTS = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                    num_attention_heads=12, max_position_embeddings=2048)  # fmt: skip


@dataclass
class ModelSpec:
    """A config read for budgeting: what it is, its Backbone, its dtype, and the mmlm config to build it."""

    name: str  # e.g. "llava (LlavaForConditionalGeneration)"
    backbone: Any  # mmlm.models.budget.Backbone
    torch_dtype: str | None
    buildable: Any  # VLMConfig | DualEncoderConfig | VisionConfig, or None where mmlm has no such model


def _hf_dtype(data: dict[str, Any]) -> str | None:
    for d in (data, data.get("text_config") or {}):
        name = d.get("torch_dtype") or d.get("dtype")
        if isinstance(name, str):
            return DTYPE_NAMES.get(name, name)
    return None


def _vlm_spec(name: str, cfg, dtype: str | None):
    from mmlm.models.budget import Backbone, LMShape
    from mmlm.models.vlm import spatial_unpad

    backbone = Backbone(cfg.vision, LMShape.from_config(cfg.lm), cfg.connector, tuple(cfg.feature_layers),
                        cfg.feature_select, anyres=spatial_unpad(cfg, cfg.patches))  # fmt: skip
    return ModelSpec(name, backbone, dtype, cfg)


def _encoder_spec(name: str, vision, dtype: str | None, buildable):
    from mmlm.models.budget import Backbone

    return ModelSpec(name, Backbone(vision, encoder_head=True), dtype, buildable)


def _blip2_spec(data: dict[str, Any], dtype: str | None) -> ModelSpec:
    from mmlm.checkpoints.hf_blip2 import NUM_QUERY_TOKENS, QFORMER_DEFAULTS, VISION_DEFAULTS
    from mmlm.fusion import ConnectorConfig
    from mmlm.models.budget import Backbone, LMShape
    from mmlm.models.vision import VisionConfig

    v = {**VISION_DEFAULTS, **(data.get("vision_config") or {})}
    q = {**QFORMER_DEFAULTS, **(data.get("qformer_config") or {})}
    t = {"model_type": "opt", **(data.get("text_config") or {})}
    if t["model_type"] != "opt":
        raise InputError(
            f"blip-2 with a {t['model_type']!r} language model: mmlm budget models decoder-only LMs "
            "(BLIP-2 with OPT), not encoder-decoders such as T5"
        )
    t = {**OPT_DEFAULTS, **t}
    vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                          layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                          mlp_dim=v["intermediate_size"], act=v["hidden_act"], class_token=True, patch_bias=True,
                          pre_norm=False, embed_dim=None)  # fmt: skip
    heads, width = t["num_attention_heads"], t["hidden_size"]
    lm = LMShape(width, t["num_hidden_layers"], heads, heads, width // heads, t["ffn_dim"], t["vocab_size"],
                 gated_mlp=False, max_positions=t["max_position_embeddings"])  # fmt: skip
    qformer = ConnectorConfig(kind="qformer", num_queries=data.get("num_query_tokens", NUM_QUERY_TOKENS),
                              depth=q["num_hidden_layers"], heads=q["num_attention_heads"], width=q["hidden_size"],
                              mlp_dim=q["intermediate_size"],
                              cross_attention_frequency=q["cross_attention_frequency"])  # fmt: skip
    # BLIP-2's Q-Former reads the tower's last hidden state, class token included
    return ModelSpec(
        "blip-2 (Blip2ForConditionalGeneration, OPT)", Backbone(vision, lm, qformer), dtype, None
    )


def spec_from_config(data: dict[str, Any], source: str) -> ModelSpec:
    """Return the ModelSpec of a config.json dict (transformers' or mmlm's); `source` names it in errors."""
    from mmlm.checkpoints.hf_clip import (
        clip_config_from_hf,
        clip_vision_config_from_hf,
        siglip_config_from_hf,
        siglip_vision_config_from_hf,
    )
    from mmlm.checkpoints.hf_idefics import vlm_config_from_idefics
    from mmlm.checkpoints.hf_idefics3 import MODEL_TYPES, vlm_config_from_idefics3
    from mmlm.checkpoints.hf_llava import vlm_config_from_llava
    from mmlm.models.config import config_from_dict
    from mmlm.models.dual_encoder import DualEncoderConfig
    from mmlm.models.vlm import VLMConfig

    dtype = _hf_dtype(data)
    if "mmlm_version" in data:
        arch, cfg = data.get("architecture"), data.get("config")
        if arch in TEXT_ONLY:
            raise InputError(
                f"{source}: mmlm architecture {arch!r} is a text-only LM; budget needs a vision tower"
            )
        if arch not in ("vlm", "dual_encoder") or not isinstance(cfg, dict):
            raise InputError(
                f"{source}: unknown mmlm architecture {arch!r}; expected 'vlm' or 'dual_encoder' with a config"
            )
        try:
            if arch == "vlm":
                return _vlm_spec("mmlm vlm", config_from_dict(VLMConfig, cfg), dtype)
            dual = config_from_dict(DualEncoderConfig, cfg)
        except (TypeError, ValueError) as e:
            raise InputError(f"{source}: not a valid mmlm {arch} config ({e})") from None
        if dual.audio is not None:
            raise InputError(f"{source}: an audio-text model has no vision tower; budget counts image tokens")
        return _encoder_spec(f"mmlm dual_encoder ({dual.family})", dual.vision, dtype, dual)
    model_type = data.get("model_type")
    try:
        if model_type == "llava":
            return _vlm_spec("llava (LlavaForConditionalGeneration)", vlm_config_from_llava(data), dtype)
        if model_type in MODEL_TYPES:
            cfg = vlm_config_from_idefics3(data)
            return _vlm_spec(f"{model_type} ({MODEL_TYPES[model_type]})", cfg, dtype)
        if model_type == "idefics":
            return _vlm_spec("idefics (IdeficsForVisionText2Text)", vlm_config_from_idefics(data), dtype)
        if model_type == "llava_next":
            return _vlm_spec(
                "llava_next (LlavaNextForConditionalGeneration)", vlm_config_from_llava(data), dtype
            )
        if model_type in ("clip", "siglip"):
            read = clip_config_from_hf if model_type == "clip" else siglip_config_from_hf
            dual = read(data)
            return _encoder_spec(f"{model_type} (vision tower)", dual.vision, dtype, dual)
        if model_type in ("clip_vision_model", "siglip_vision_model"):
            read = (
                clip_vision_config_from_hf
                if model_type == "clip_vision_model"
                else siglip_vision_config_from_hf
            )
            vision = read(data)
            return _encoder_spec(model_type, vision, dtype, vision)
        if model_type == "blip-2":
            return _blip2_spec(data, dtype)
        if model_type == "gemma3":
            from mmlm.checkpoints.hf_gemma3 import gemma3_budget_config

            return _vlm_spec("gemma3 (Gemma3ForConditionalGeneration)", gemma3_budget_config(data), dtype)
    except (KeyError, TypeError) as e:
        raise InputError(f"{source}: a {model_type} config without a valid {e}") from None
    if model_type in TEXT_ONLY:
        raise InputError(
            f"{source}: model_type {model_type!r} is a text-only LM; budget needs a vision tower"
        )
    raise InputError(
        f"{source}: model_type {model_type!r} is not supported; mmlm budget reads llava, llava_next, idefics3, smolvlm, "
        f"clip, siglip, "
        "clip_vision_model, siglip_vision_model, blip-2, gemma3 and mmlm's own vlm and dual_encoder configs"
    )


def parse_tiles(
    value: str | None, option: str = "--tiles", example: str = "ROWSxCOLS"
) -> tuple[int, int] | None:
    """Return (rows, cols) from "RxC" (or (height, width) from `--resolution` HxW), or raise InputError."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise InputError(f"{option}: got {value!r}; expected {example} with positive integers, e.g. 2x2")
    return int(match[1]), int(match[2])


def resolution_tiles(value: str, folder: Path | None) -> tuple[int, int] | None:
    """Return the (rows, cols) tiles an image of `value` ("HxW" px) is split into by the folder's image processor
    (Idefics3/SmolVLM splitting), None when it stays one view; InputError without such a processor."""
    from mmlm.checkpoints.processor_files import image_processor_settings
    from mmlm.processing.idefics3_image import HF_TYPES, idefics3_processing_from_hf

    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise InputError(f"--resolution: got {value!r}; expected HEIGHTxWIDTH in pixels, e.g. 480x640")
    settings = image_processor_settings(folder, required=False) if folder is not None else None
    kind = str((settings or {}).get("image_processor_type", "")).removesuffix("Pil").removesuffix("Fast")
    if kind not in HF_TYPES:
        raise InputError(
            "--resolution: needs --model with an image processor that splits images (Idefics3, SmolVLM); "
            "use --tiles otherwise"
        )
    rows, cols = idefics3_processing_from_hf(settings)[0].grid(int(match[1]), int(match[2]))
    return (rows, cols) if rows else None


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise InputError(f"{name}: got {value}; expected at least {minimum}")
    return value


def video_frames(args: argparse.Namespace) -> int:
    """Return the frames a video gives: --frames, or --video-seconds × --fps (at least one), capped at --max-frames."""
    if args.video_seconds is None:
        if args.fps is not None:
            raise InputError("--fps needs --video-seconds (the video's duration)")
        return _positive("--frames", args.frames)
    if args.video_seconds <= 0 or (args.fps or 0) <= 0:
        raise InputError(
            f"--video-seconds and --fps: expected positive numbers, got {args.video_seconds} and {args.fps}"
        )
    # frames at t = 0, 1/fps, 2/fps, ... while t < duration; above the cap they are spread over the whole video
    return min(_positive("--max-frames", args.max_frames), math.ceil(args.video_seconds * args.fps - 1e-9))


def _dtype(args: argparse.Namespace, spec: ModelSpec) -> tuple[str, str]:
    """Return (dtype of the KV cache, where it came from)."""
    if args.dtype is not None:
        name = DTYPE_NAMES.get(args.dtype, args.dtype)
        if name not in DTYPE_BYTES:
            raise InputError(f"--dtype: got {args.dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
        return name, "--dtype"
    if spec.torch_dtype in DTYPE_BYTES:
        return spec.torch_dtype, "the config's torch_dtype"
    return "bfloat16", "assumed: the config names no dtype"


# ---- output ----------------------------------------------------------------------------------------------


def flops_unit(values: list[int]) -> tuple[float, str]:
    """Return (divisor, name) of the FLOP unit that shows the largest of `values` readably."""
    top = max(values, default=0)
    return next(((d, n) for d, n in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")) if top >= 10 * d),
                (1.0, "FLOPs"))  # fmt: skip


def size_text(n: float) -> str:
    """Return a byte count in KiB, MiB or GiB."""
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:,.1f} {name}"
    return f"{n:,.0f} B"


def rate_text(flops: int, ms: float | None, batch: int) -> str:
    """Return measured ms and the FLOP rate it means ("" when not measured)."""
    if ms is None:
        return ""
    rate = flops * batch / (ms / 1e3)
    scale, name = next(
        ((d, n) for d, n in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s")) if rate >= d), (1e6, "MFLOP/s")
    )
    return f"{ms:10.2f} ms  {rate / scale:8.2f} {name}"


def describe(spec: ModelSpec, budget, dtype: str, dtype_source: str) -> list[str]:
    """Return the header lines: the tower, the features read, the image's views, the LM and the KV dtype."""
    from mmlm.models.budget import blocks_run

    b, image, v = spec.backbone, budget.image, spec.backbone.vision
    side = image.image_size // v.patch_size
    cls = " + class token" if v.class_token else ""
    lines = [f"  vision   ViT {v.layers} layers × {v.width} ({v.heads} heads), patch {v.patch_size}, "
             f"{image.image_size} px: {side}×{side} = {budget.patches} patches{cls}"]  # fmt: skip
    if b.lm is not None:
        select = "class token dropped" if b.feature_select == "default" else "all tokens"
        lines.append(f"           feature layer {list(b.feature_layers)}: {blocks_run(b)} of {v.layers} blocks "
                     f"run; select {b.feature_select} ({select})")  # fmt: skip
    views = "1 view"
    if image.tiles is not None:
        (rows, cols), px = image.tiles, image.image_size
        views = f"{rows}x{cols} tiles of {px} px (a {rows * px}×{cols * px} image) + 1 global view"
    if b.anyres is not None:
        (height, width), g = image.resolution, b.anyres.side
        top, bottom, left, right = b.anyres.window(height, width)
        lines.append(f"  anyres   a {height}x{width} image: grid {rows}x{cols} from image_grid_pinpoints; spatial_unpad "
                     f"keeps {bottom - top}x{right - left} of the {rows * g}x{cols * g} tile tokens, + "
                     f"{bottom - top} newlines + {g * g} global view")  # fmt: skip
    frames = f"{image.frames} frame" + ("s" if image.frames > 1 else "")
    if image.video_pool > 1:
        frames += f" ({image.video_pool} averaged per slot: {image.slots} slots)"
    tome = f"ToMe r={image.merge_tokens}" if image.merge_tokens else "ToMe off"
    lines.append(f"  image    {views} × {frames}; {tome}: {budget.vision.sequence} -> "
                 f"{budget.vision.tokens} tokens per view")  # fmt: skip
    if b.lm is not None:
        lm = b.lm
        mlp = "SwiGLU" if lm.gated_mlp else "MLP"
        lines.append(f"  LM       {lm.layers} layers × {lm.width}, {lm.heads} heads / {lm.kv_heads} KV heads × "
                     f"{lm.head_dim}, {mlp} {lm.mlp_dim}; {image.text_tokens} text tokens")  # fmt: skip
        lines.append(f"  KV cache {dtype}, {DTYPE_BYTES[dtype]} bytes per value ({dtype_source})")
    return lines


def render_table(spec: ModelSpec, budget, dtype: str, dtype_source: str, measured: dict | None) -> str:
    """Return the readable report: header, per-stage table of the model's own connector, fusion comparison."""
    m = measured or {}
    batch = m.get("batch_size", 1)
    own, image = budget.own, budget.image
    views = image.views * image.frames
    scale, unit = flops_unit([s.total_flops for s in budget.styles] + [budget.vision_flops])

    def f(flops: int) -> str:
        return f"{flops / scale:,.1f}"

    lines = [f"mmlm budget: {spec.name}", *describe(spec, budget, dtype, dtype_source), ""]
    title = "per image" + (f" ({own.style})" if own else "")
    lines.append(f"{title:42}{'tokens':>8}{unit:>12}" + ("    measured" if measured else ""))
    stages = [(f"  vision encoder, {views} × ({budget.vision.sequence} -> {budget.vision.tokens})",
               budget.vision.tokens * views, budget.vision_flops, m.get("vision_ms"))]  # fmt: skip
    if own is not None:
        media = f" ({own.media_tokens} media)" if own.media_tokens else ""
        stages += [
            (f"  connector {own.kind}{media}", own.visual_tokens, own.connector_flops, m.get("connector_ms")),
            (f"  LM prefill ({own.visual_tokens} visual + {image.text_tokens} text)",
             own.visual_tokens + image.text_tokens, own.lm_flops, m.get("lm_prefill_ms")),
        ]  # fmt: skip
    for name, tokens, flops, ms in stages:
        lines.append(f"{name:42}{tokens:>8,}{f(flops):>12}  {rate_text(flops, ms, batch)}".rstrip())
    lines.append(f"{'  total':50}{f(own.total_flops if own else budget.vision_flops):>12}")
    if measured:
        lines.append(f"  measured: ms per forward of {batch} image(s), median of {m['runs']} runs after a warm-up, "
                     f"{m['device']}, {m['dtype']}, {m['weights']} weights")  # fmt: skip
        if "visual_tokens" in m and own is not None and m["visual_tokens"] != own.visual_tokens:
            lines.append(
                f"  warning: the model made {m['visual_tokens']} visual tokens, the plan {own.visual_tokens}"
            )
    if own is None:
        lines.append(
            "  (no language model in this config: LM prefill, KV cache and the fusion comparison need a VLM)"
        )
        return "\n".join(lines)
    sequence = own.visual_tokens + image.text_tokens
    if own.media_tokens:
        lines.append(f"  KV cache: {size_text(own.kv_bytes)} ({sequence:,} sequence tokens in every layer + "
                     f"{own.media_tokens} media tokens in each gated block)")  # fmt: skip
    else:
        per_token = size_text(own.kv_bytes / sequence)
        lines.append(f"  KV cache: {sequence:,} tokens × {per_token} = {size_text(own.kv_bytes)}")
    lines += ["", f"fusion styles, same tower and LM ({unit} per image; * = this model's connector)"]
    lines.append(f"  {'style':30}{'LM tokens':>10}{'vision':>11}{'connector':>11}{'LM prefill':>12}{'total':>12}"
                 f"{'KV cache':>12}")  # fmt: skip
    for i, s in enumerate(budget.styles):
        mark = "*" if i == 0 else " "
        if s.visual_tokens is None:
            lines.append(f"{mark} {s.style:30}{s.note:>10}")
            continue
        tokens = f"{s.visual_tokens:,}" + (f"+{s.media_tokens}m" if s.media_tokens else "")
        lines.append(f"{mark} {s.style:30}{tokens:>10}{f(s.vision_flops):>11}{f(s.connector_flops):>11}"
                     f"{f(s.lm_flops):>12}{f(s.total_flops):>12}{size_text(s.kv_bytes):>12}"
                     + (f"  ({s.note})" if s.note else ""))  # fmt: skip
    if any(s.media_tokens for s in budget.styles):
        lines.append("  1+Nm: one <image> marker in the sequence, N media tokens read by the gated "
                     "cross-attention blocks (their FLOPs are in LM prefill)")  # fmt: skip
    return "\n".join(lines)


def cmd_budget(args: argparse.Namespace) -> None:
    """Print the visual-token budget of one image: tokens, FLOPs per stage, KV cache, fusion styles."""
    from mmlm.checkpoints.hub import MODEL_FILES, SETTINGS_FILES, resolve_folder
    from mmlm.json_files import read_json_object
    from mmlm.models.budget import ImageInput, plan_budget

    folder = None
    if args.model:
        # the plan reads config.json (and the image processor's settings): weights only to --measure them
        folder = resolve_folder(args.model, args.revision, MODEL_FILES if args.measure else SETTINGS_FILES)
        source = folder / "config.json"
    else:
        source = Path(args.config)
        if source.is_dir():
            raise InputError(f"--config {source} is a folder; pass its config.json, or use --model {source}")
    if read_json_object(source).get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        from mmlm.cli.budget_qwen2_vl import qwen2_vl_budget_report

        print(qwen2_vl_budget_report(args, read_json_object(source), folder, DTYPE_BYTES, flops_unit))
        return
    spec = spec_from_config(read_json_object(source), str(source))
    if args.train:
        from mmlm.cli.budget_train import train_budget_report

        print(train_budget_report(args, spec, source))
        return
    v = spec.backbone.vision
    size = _positive("--image-size", args.image_size or v.image_size, v.patch_size)
    pool = (
        args.video_pool
        if args.video_pool is not None
        else read_json_object(source).get("config", {}).get("video_pool", 1)
    )
    if args.resolution is not None and args.tiles is not None:
        raise InputError(
            "--resolution and --tiles: give one (--resolution finds the tiles of an image that size)"
        )
    # LLaVA-NeXT finds its grid from the resolution in plan_budget; Idefics3's processor splits it here
    by_processor = args.resolution is not None and spec.backbone.anyres is None
    tiles = resolution_tiles(args.resolution, folder) if by_processor else parse_tiles(args.tiles)
    image = ImageInput(size, tiles, video_frames(args),
                       _positive("--text-tokens", args.text_tokens, 0),
                       _positive("--merge-tokens", v.merge_tokens if args.merge_tokens is None else args.merge_tokens, 0),
                       _positive("--video-pool", pool),
                       None if by_processor else parse_tiles(args.resolution, "--resolution", "HEIGHTxWIDTH"))  # fmt: skip
    _positive("--runs", args.runs)
    _positive("--batch-size", args.batch_size)
    dtype, dtype_source = _dtype(args, spec)
    budget = plan_budget(spec.backbone, image, DTYPE_BYTES[dtype])
    measured = None
    if args.measure:
        from mmlm.cli.budget_measure import measure

        measured = measure(args, spec, budget)
    if args.json:
        out = {"model": spec.name, "config": str(source), "kv_dtype": dtype, "kv_dtype_source": dtype_source,
               **budget.to_dict(), "measured": measured}  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        print(render_table(spec, budget, dtype, dtype_source, measured))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `budget` to the command line."""
    p = sub.add_parser("budget", help="visual tokens, FLOPs and KV cache per image, for every fusion style")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", help="a model folder or hub id (reads its config.json; --measure loads its weights)"
    )
    add_revision_arg(p)
    source.add_argument(
        "--config",
        help="a model config.json alone: transformers' (LLaVA, LLaVA-NeXT, CLIP, SigLIP, BLIP-2) or mmlm's",
    )
    p.add_argument("--image-size", type=int, help="the tower's input side in px (default: the config's)")
    p.add_argument("--tiles", help="ROWSxCOLS tiles of --image-size each, plus one global view (LLaVA-NeXT)")
    p.add_argument(
        "--resolution",
        help="HEIGHTxWIDTH of an image: a LLaVA-NeXT model picks its tiles and token count from it; an Idefics3 "
        "processor (--model folder) splits it into its tiles; a Qwen2-VL processor resizes it to its patch grid",
    )
    p.add_argument("--frames", type=int, default=1, help="video frames per image (each encoded)")
    p.add_argument("--video-seconds", type=float, help="a video's duration; with --fps sets the frame count")
    p.add_argument("--fps", type=float, help="frames sampled per second of video (f_s)")
    p.add_argument("--max-frames", type=int, default=64, help="the cap on sampled frames")
    p.add_argument(
        "--video-pool", type=int, help="frames averaged per slot (default: the config's video_pool, 1)"
    )
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens in the prompt")
    p.add_argument(
        "--merge-tokens", type=int, help="ToMe: tokens merged per ViT block, r (default: the config's)"
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="build the model (random weights for --config) and time each stage",
    )
    p.add_argument("--runs", type=int, default=5, help="--measure: timed runs per stage (median reported)")
    p.add_argument("--device", default="cpu", help="--measure: cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", help="float32 | bfloat16 | float16: the KV cache's (default: the config's) and --measure's"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="--measure: images per forward pass; --train: samples per device",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    from mmlm.cli.budget_train import add_train_args

    add_train_args(p)
    p.set_defaults(func=cmd_budget)
