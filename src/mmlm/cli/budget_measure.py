"""`mmlm budget --measure`: the measured milliseconds of each stage (tower, connector, LM prefill) of one image.

The model is built with random weights from its config (up to MEASURE_LIMIT_BYTES of fp32 parameters) or
loaded from a folder; each stage runs --runs times after a warm-up and the median is reported beside the
planned FLOPs (mmlm/models/budget.py).
"""

import argparse
import dataclasses
import statistics
import time
from typing import Any

from mmlm.errors import InputError

MEASURE_LIMIT_BYTES = 4 * 2**30  # a random-weight build holds at most 4 GiB of fp32 parameters


def median_ms(fn, runs: int, sync) -> float:
    """Return the median wall time of `fn()` in ms over `runs` runs, after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _random_model(spec: Any, device, dtype):
    import torch

    from mmlm.models.dual_encoder import DualEncoderConfig
    from mmlm.models.vision import VisionConfig, VisionTransformer
    from mmlm.models.vlm import VisionLanguageModel, VLMConfig

    cfg = spec.buildable
    if cfg is None:
        raise InputError(
            f"--measure: mmlm cannot build a {spec.name} model; its budget is planned from shapes only"
        )
    if isinstance(cfg, VLMConfig):

        def make():
            return VisionLanguageModel(cfg)
    else:
        vision: VisionConfig = cfg.vision if isinstance(cfg, DualEncoderConfig) else cfg

        def make():
            return VisionTransformer(vision)

    with torch.device("meta"):
        params = sum(p.numel() for p in make().parameters())
    if params * 4 > MEASURE_LIMIT_BYTES:
        raise InputError(
            f"--measure: {spec.name} has {params / 1e9:.2f} B parameters ({params * 4 / 2**30:.1f} GiB in fp32), "
            f"over the {MEASURE_LIMIT_BYTES // 2**30} GiB limit for random weights; pass a smaller config "
            "(fewer layers, narrower width) or --model with real weights"
        )
    torch.manual_seed(0)
    with torch.device(device):
        return make().to(dtype).eval()


def measure(args: argparse.Namespace, spec: Any, budget: Any) -> dict[str, Any]:
    """Return measured ms per stage (median of --runs after a warm-up) on random or loaded weights; `spec` is
    mmlm.cli.budget's ModelSpec, `budget` the plan (mmlm.models.budget.Budget)."""
    import torch

    import mmlm
    from mmlm.inference.load import parse_device, parse_dtype
    from mmlm.models.vision import VisionTransformer

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype or ("float32" if device.type == "cpu" else spec.torch_dtype))
    if args.model:
        loaded = mmlm.load(args.model, device=device, dtype=dtype, revision=args.revision)
        model = getattr(loaded.model, "visual", loaded.model)
    else:
        model = _random_model(spec, device, dtype)
    tower = model if isinstance(model, VisionTransformer) else model.vision
    tower.cfg = dataclasses.replace(tower.cfg, merge_tokens=budget.image.merge_tokens)
    if model is not tower:  # a VLM counts its slots from its own config
        model.cfg = dataclasses.replace(model.cfg, vision=tower.cfg)
    image, v = budget.image, tower.cfg
    pixels = torch.randn(args.batch_size * image.views * image.frames, v.channels, image.image_size,
                         image.image_size, device=device, dtype=dtype)  # fmt: skip

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result: dict[str, Any] = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                              "batch_size": args.batch_size, "runs": args.runs,
                              "weights": "loaded" if args.model else "random"}  # fmt: skip
    with torch.inference_mode():
        if model is tower:
            result["vision_ms"] = median_ms(lambda: tower(pixels), args.runs, sync)
            return result
        cfg = model.cfg
        model.style.ready_untrained(model.connector)  # unified: an unfitted codebook gets random codes
        features = model.patch_features(pixels)
        # the connector stage: what fills the image slots, or what the style does instead (Flamingo's resampler)
        # each view's frames, video_pool to a slot (the last group may be shorter)
        groups = [min(image.video_pool, image.frames - i) for i in range(0, image.frames, image.video_pool)]
        frames = torch.tensor(groups * (args.batch_size * image.views), device=device)
        connect = lambda: model.style.connector_work(  # noqa: E731
            model.connector, features, lambda: model.slot_tokens(features, frames)
        )
        slots = model.image_tokens * len(frames) // args.batch_size
        sizes = None
        if model.anyres is not None:  # LLaVA-NeXT: each image's slots follow its resolution
            slots, sizes = budget.own.visual_tokens, torch.tensor([image.resolution] * args.batch_size)
        text = torch.full((args.batch_size, image.text_tokens), 1, device=device)
        ids = torch.cat(
            [torch.full((args.batch_size, slots), cfg.image_token_id, device=device), text], dim=1
        )
        embeds, media = model.prepare(ids, pixels, None, frames, sizes)
        tokens = slots
        result["vision_ms"] = median_ms(lambda: model.patch_features(pixels), args.runs, sync)
        result["connector_ms"] = median_ms(connect, args.runs, sync)
        result["lm_prefill_ms"] = median_ms(
            lambda: model.run_lm(embeds, media, last_only=True), args.runs, sync
        )
        result["visual_tokens"] = tokens
    return result
