"""gpu_suite.py's correctness section: mmlm on the device against transformers on the same device, and mmlm's
training steps on the device against the same steps on CPU.

Tiny random CLIP, SigLIP, Llama and LLaVA folders are written as the tests write them (tests/fixtures_*.py),
loaded with `mmlm.load` on the device in fp32 and bf16, and compared with transformers' models of the same
weights on the same device:
- embeddings (CLIP, SigLIP) and logits (Llama, LLaVA): fp32 within 1e-4 absolute; bf16 within 8 units in the
  last place (ulps) of the reference's largest value (2^-7 of its power of two: 1/32 at logits of 4-8). Both
  sides compute in bf16, whose values hold 8 significant bits, and round at different places (fused q/k/v,
  attention kernels, where casts happen) in each layer; on CPU the tiny models differ by up to 4 ulps
  (LLaVA's logits: 0.127 at 5.1). A real mistake (a wrong weight, a missing scale) moves them by far more.
- greedy tokens (Llama, LLaVA) equal in fp32; every KV-cache kind of `mmlm.inference.base.CacheKind` gives the
  dynamic cache's text.
- three CLIP and three LLaVA training steps with mmlm's own step functions (the contrastive loop's
  `_optimizer_step`, the VLM loop's `RowLosses`, `accumulate_gradients`, `optimizer_step`) in fp32: the losses
  on the device within 1e-4 of the same steps on CPU.
fp32 on CUDA means fp32: TF32 matmuls and convolutions are switched off for this section.
Last, the tests marked `cuda` (`pytest -m cuda`: the CUDA graph capture and replay, CUDA training) run in a
subprocess; with --cpu-smoke they are only collected, which proves that their files import and that they exist.
"""

import contextlib
import copy
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from PIL import Image

import mmlm
from mmlm.inference.base import CacheKind
from mmlm.inference.generation import GenerationSettings, generate_ids, lm_step
from mmlm.train.config import TrainConfig
from mmlm.train.loop import _optimizer_step, contrastive_loss
from mmlm.train.optim import build_optimizer, build_scheduler, fused_adamw
from mmlm.train.vlm_config import StageConfig
from mmlm.train.vlm_loop import (
    IntervalLosses,
    RowLosses,
    accumulate_gradients,
    optimizer_step,
    stage_optimizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_lm import write_tiny_lm  # noqa: E402
from fixtures_models import write_tiny_clip, write_tiny_siglip  # noqa: E402
from fixtures_vlm import write_tiny_llava  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_TOLERANCE = 1e-4
BF16_ULPS = 8
TRAIN_STEPS = 3
NEW_TOKENS = 8
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
LM_PROMPT = "a small dog runs across the green field"


@contextlib.contextmanager
def exact_fp32():
    """Switch TF32 off for matmuls and cuDNN convolutions (the patch embedding) while the checks run."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def agreement(theirs: torch.Tensor, ours: torch.Tensor, dtype: str) -> dict:
    """Return ok, the largest absolute difference and the tolerance it was held to (see the module docstring)."""
    theirs, ours = theirs.float(), ours.float()
    diff, scale = (theirs - ours).abs().max().item(), theirs.abs().max().item()
    # a bf16 ulp at x is 2^(exponent of x - 7): 8 significant bits, the leading one implicit
    tolerance = FP32_TOLERANCE if dtype == "fp32" else BF16_ULPS * 2.0 ** (math.frexp(scale)[1] - 1 - 7)
    return {"ok": diff <= tolerance, "max_abs_diff": diff, "tolerance": tolerance, "reference_max_abs": scale}


def same_tokens(theirs: list, ours: list) -> dict:
    """Return ok when two token sequences (or texts) are equal, and at how many positions they differ."""
    differ = sum(a != b for a, b in zip(theirs, ours, strict=False)) + abs(len(theirs) - len(ours))
    return {"ok": differ == 0, "positions_differ": differ, "length": len(theirs)}


def perturb(model: torch.nn.Module) -> None:
    """Scale every weight by 1.05 (--inject-mismatch): every check of this model must fail."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)


def load_pair(suite, folder: Path, reference, torch_dtype: torch.dtype = torch.float32):
    """Return (mmlm's model of `folder`, a copy of transformers' `reference`), both on the suite's device in
    `torch_dtype`; mmlm's weights perturbed when the suite injects a mismatch."""
    loaded = mmlm.load(folder, suite.device, torch_dtype)
    if suite.inject_mismatch:
        perturb(loaded.model)
    return loaded, copy.deepcopy(reference).to(suite.device, torch_dtype)


def photo(size: int, seed: int = 0) -> Image.Image:
    """Return a random RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def contrastive_checks(suite, family: str, folder: Path, reference) -> None:
    """Image and text embeddings of mmlm and transformers, fp32 and bf16, on the device."""
    for dtype, torch_dtype in DTYPES.items():

        def embeddings(torch_dtype=torch_dtype, dtype=dtype) -> dict:
            loaded, ref = load_pair(suite, folder, reference, torch_dtype)
            size = ref.config.vision_config.image_size
            pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            pixels = pixels.to(suite.device, torch_dtype)
            ids = loaded.tokenizer(["a red circle", "two blue squares on grass"]).to(suite.device)
            with torch.inference_mode():
                out = ref(input_ids=ids, pixel_values=pixels)
                ours = torch.cat([loaded.model.encode_image(pixels), loaded.model.encode_text(ids)])
            return agreement(torch.cat([out.image_embeds, out.text_embeds]), ours, dtype)

        suite.part("correctness", f"{family}/embeddings", dtype, embeddings)


def contrastive_training(suite, folder: Path) -> None:
    """CLIP: TRAIN_STEPS steps of mmlm's contrastive loop on the device and on CPU, fp32; losses compared."""

    def losses(device: torch.device, perturbed: bool = False) -> list[float]:
        model = mmlm.load(folder, device).model.train()
        if perturbed:
            perturb(model)
        cfg = TrainConfig()
        opt = build_optimizer(model, cfg.optim, fused_adamw(device))
        sched = build_scheduler(opt, cfg.optim, TRAIN_STEPS)
        g = torch.Generator().manual_seed(0)
        size, text = model.cfg.vision.image_size, model.cfg.text
        batches = []
        for _ in range(TRAIN_STEPS):
            ids = torch.randint(3, text.eos_token_id, (4, 10), generator=g)
            ids[:, -1] = text.eos_token_id
            batches.append((torch.randn(4, 3, size, size, generator=g), ids))
        stream = iter(batches)
        return [_optimizer_step(cfg, model, model, stream, device, None, False, contrastive_loss, opt, sched).item()
                for _ in range(TRAIN_STEPS)]  # fmt: skip

    def compare() -> dict:
        on_cpu, on_device = losses(torch.device("cpu")), losses(suite.device, suite.inject_mismatch)
        return {**agreement(torch.tensor(on_cpu), torch.tensor(on_device), "fp32"), "losses": on_device}

    suite.part("correctness", "clip/train_steps_vs_cpu", "fp32", compare)


def lm_checks(suite, folder: Path, reference) -> None:
    """Llama: logits in fp32 and bf16, greedy tokens in fp32, and every cache kind's text."""
    for dtype, torch_dtype in DTYPES.items():

        def logits(torch_dtype=torch_dtype, dtype=dtype) -> dict:
            loaded, ref = load_pair(suite, folder, reference, torch_dtype)
            ids, _ = loaded.encode([LM_PROMPT])
            with torch.inference_mode():
                return agreement(ref(ids).logits, loaded.model(ids).logits, dtype)

        suite.part("correctness", "llama/logits", dtype, logits)

    def greedy() -> dict:
        loaded, ref = load_pair(suite, folder, reference)
        ids, _ = loaded.encode([LM_PROMPT])
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=0)  # fmt: skip
        theirs = out[0, ids.shape[1] :].tolist()
        theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs  # mmlm stops at eos and leaves it out
        ours = loaded.model.new_cache(1)
        steps = generate_ids(lm_step(loaded.model), ours, GenerationSettings(NEW_TOKENS), [2], ids)
        return same_tokens(theirs, [t for tokens in steps for _, t in tokens])

    suite.part("correctness", "llama/greedy_tokens", "fp32", greedy)
    loaded = None
    for kind in get_args(CacheKind):

        def cache_kind(kind=kind) -> dict:
            nonlocal loaded
            loaded = loaded or mmlm.load(folder, suite.device)
            dynamic = loaded.generate(LM_PROMPT, max_new_tokens=NEW_TOKENS, cache="dynamic")
            return {**same_tokens(dynamic, loaded.generate(LM_PROMPT, max_new_tokens=NEW_TOKENS, cache=kind)),
                    "text": dynamic}  # fmt: skip

        suite.part("correctness", f"llama/generate_cache_{kind}", "fp32", cache_kind)


def vlm_checks(suite, folder: Path, reference) -> None:
    """LLaVA: logits in fp32 and bf16, greedy tokens in fp32, every cache kind's text."""
    image = photo(reference.config.vision_config.image_size)
    for dtype, torch_dtype in DTYPES.items():

        def logits(torch_dtype=torch_dtype, dtype=dtype) -> dict:
            loaded, ref = load_pair(suite, folder, reference, torch_dtype)
            batch = loaded.processor(PROMPT, [image])
            ids, pixels = (
                batch["input_ids"].to(suite.device),
                batch["pixel_values"].to(suite.device, torch_dtype),
            )
            with torch.inference_mode():
                return agreement(ref(input_ids=ids, pixel_values=pixels).logits, loaded.model(ids, pixels).logits,
                                 dtype)  # fmt: skip

        suite.part("correctness", "llava/logits", dtype, logits)

    def greedy() -> dict:
        loaded, ref = load_pair(suite, folder, reference)
        batch = loaded.processor(PROMPT, [image])
        with torch.inference_mode():
            out = ref.generate(input_ids=batch["input_ids"].to(suite.device), max_new_tokens=NEW_TOKENS,
                               attention_mask=batch["attention_mask"].to(suite.device), do_sample=False,
                               pixel_values=batch["pixel_values"].to(suite.device), pad_token_id=0)  # fmt: skip
        theirs = out[0, batch["input_ids"].shape[1] :].tolist()
        theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs
        return same_tokens(theirs, loaded.generate_tokens(PROMPT, [image], max_new_tokens=NEW_TOKENS))

    suite.part("correctness", "llava/greedy_tokens", "fp32", greedy)
    loaded = None
    for kind in get_args(CacheKind):

        def cache_kind(kind=kind) -> dict:
            nonlocal loaded
            loaded = loaded or mmlm.load(folder, suite.device)
            dynamic = loaded.generate(PROMPT, [image], max_new_tokens=NEW_TOKENS, cache="dynamic")
            ours = loaded.generate(PROMPT, [image], max_new_tokens=NEW_TOKENS, cache=kind)
            return {**same_tokens(dynamic, ours), "text": dynamic}

        suite.part("correctness", f"llava/generate_cache_{kind}", "fp32", cache_kind)


def vlm_training(suite, folder: Path) -> None:
    """LLaVA: TRAIN_STEPS steps of mmlm's VLM loop (connector and LM train) on the device and on CPU, fp32."""
    image = photo(32, seed=1)

    def losses(device: torch.device, perturbed: bool = False) -> list[float]:
        loaded = mmlm.load(folder, "cpu")
        model = copy.deepcopy(loaded.model).to(device).train()  # the training layout, not CPU decoding's
        if perturbed:
            perturb(model)
        stage = StageConfig(steps=TRAIN_STEPS, train=["connector", "lm"])
        opt = stage_optimizer(model, stage, device)
        sched = build_scheduler(opt, stage.optim, TRAIN_STEPS)
        prompt = loaded.processor([PROMPT, PROMPT], [[image], [photo(32, seed=2)]])
        ids = prompt["input_ids"]
        labels = ids.clone()
        labels[:, : ids.shape[1] - 4] = -100  # the last four tokens are the answer
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                 "pixel_values": prompt["pixel_values"], "audio_features": None, "image_frames": None,
                 "image_sizes": None, "images_per_sample": torch.ones(2, dtype=torch.long),
                 "audio_per_sample": torch.zeros(2, dtype=torch.long)}  # fmt: skip
        net, out = RowLosses(model), []
        for _ in range(TRAIN_STEPS):
            interval = IntervalLosses()
            accumulate_gradients(net, iter([batch]), 1, device, False, "token", interval)
            optimizer_step(model, opt, sched, 1.0)
            out.append(interval.figures()["loss"])
        return out

    def compare() -> dict:
        on_cpu, on_device = losses(torch.device("cpu")), losses(suite.device, suite.inject_mismatch)
        return {**agreement(torch.tensor(on_cpu), torch.tensor(on_device), "fp32"), "losses": on_device}

    suite.part("correctness", "llava/train_steps_vs_cpu", "fp32", compare)


def correctness(suite) -> None:
    """Write the tiny folders, then run every check of this module on the suite's device."""
    with tempfile.TemporaryDirectory() as tmp, exact_fp32():
        root = Path(tmp)
        references = {}

        def write() -> dict:
            for name, writer in (("clip", write_tiny_clip), ("siglip", write_tiny_siglip),
                                 ("llama", write_tiny_lm), ("llava", write_tiny_llava)):  # fmt: skip
                references[name] = writer(root / name).eval()
            return {"ok": True, "folders": sorted(references)}

        suite.part("correctness", "write_tiny_models", "fp32", write)
        if len(references) < 4:  # the error is on the line above
            return
        contrastive_checks(suite, "clip", root / "clip", references["clip"])
        contrastive_checks(suite, "siglip", root / "siglip", references["siglip"])
        contrastive_training(suite, root / "clip")
        lm_checks(suite, root / "llama", references["llama"])
        vlm_checks(suite, root / "llava", references["llava"])
        vlm_training(suite, root / "llava")
    cuda_tests(suite)


TESTS = Path(__file__).resolve().parents[1] / "tests"


def cuda_tests(suite) -> None:
    """Run the test files that hold `cuda`-marked tests with `pytest -m cuda` (on CPU: collect them only); the
    line is ok when they all pass (or, collecting, when at least one is found and nothing fails to import)."""

    def run() -> dict:
        files = sorted(str(p) for p in TESTS.glob("test_*.py") if "pytest.mark.cuda" in p.read_text())
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
        if suite.smoke:
            command.append("--collect-only")
        done = subprocess.run(command, cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
        summary = (done.stdout.strip().splitlines() or [""])[-1]
        # "2 passed, 1 failed in 9.1s", or collecting: "2/48 tests collected (46 deselected) in 3.2s"
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
        if collected := re.search(r"(\d+)(?:/\d+)? tests? collected", summary):
            counts["collected"] = int(collected.group(1))
        found = counts.get("passed", 0) + counts.get("collected", 0)
        ok = done.returncode == 0 and found > 0 and not counts.get("failed") and not counts.get("errors")
        return {"ok": ok, "files": [Path(f).name for f in files], "summary": summary[-300:], "counts": counts}

    suite.part("correctness", "pytest_cuda", "-", run, needs_s=0 if suite.smoke else 120)
