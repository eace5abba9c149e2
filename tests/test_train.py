"""Contrastive training end to end: exact resume after kill -9, data files, tower locking, exports."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mmlm
from mmlm.data.synthetic import shapes
from mmlm.train.config import load_train_config
from mmlm.train.run import run_clip_training

TINY = [
    "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.width=16", "model.vision.layers=1",
    "model.vision.heads=2", "model.vision.mlp_dim=32", "model.vision.embed_dim=8", "model.text.width=16",
    "model.text.layers=1", "model.text.heads=2", "model.text.mlp_dim=32", "model.text.embed_dim=8",
    "model.text.context_length=24", "vocab_size=300", "batch_size=16", "log_every=1", "optim.warmup_steps=2",
    "data.shapes_samples=256", "data.workers=0",
]  # fmt: skip


def losses_by_step(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]  # a resumed run logs the steps after its checkpoint again
    return out


def train_command(run_dir, *extra):
    return [sys.executable, "-m", "mmlm", "train", "clip", *TINY, f"out_dir={run_dir}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_after_kill_9_repeats_the_uninterrupted_losses(tmp_path, accumulation):
    steps = ["steps=150", "checkpoint_every=10", f"optim.accumulation={accumulation}"]
    subprocess.run(train_command(tmp_path / "straight", *steps), check=True, capture_output=True)
    victim = subprocess.Popen(train_command(tmp_path / "killed", *steps), stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    killed_at = json.loads(latest.read_text())["step"]
    subprocess.run(
        train_command(tmp_path / "killed", *steps, "--resume", "latest"), check=True, capture_output=True
    )
    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "killed")
    assert killed_at < 150 and len(straight) == 150
    assert resumed == straight  # bit-identical on CPU with a fixed seed
    checkpoint = mmlm.load(latest.parent / json.loads(latest.read_text())["path"])
    assert checkpoint.encode_text(["a red circle"]).shape == (1, 8)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_resume_with_accumulation_repeats_the_uninterrupted_losses(tmp_path, family):
    siglip = ["model.family=siglip", "model.logit_bias_init=-10.0"] if family == "siglip" else []
    overrides = [
        *TINY,
        *siglip,
        "steps=4",
        "checkpoint_every=2",
        "optim.accumulation=2",
        f"out_dir={tmp_path}",
    ]
    _, straight = run_clip_training(load_train_config(None, overrides))
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2
    _, resumed = run_clip_training(load_train_config(None, overrides), resume="latest")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit-identical on CPU


def test_training_on_a_jsonl_manifest_exports_a_loadable_model(tmp_path):
    manifest = shapes.write_dataset(tmp_path / "data", 64, seed=0, image_size=16)
    (tmp_path / "data" / "images" / "000003.png").write_bytes(b"broken")  # skipped and counted, never fatal
    overrides = [
        f"out_dir={tmp_path / 'run'}",
        f"data.source={manifest}",
        f"val_data={manifest}",
        "eval_every=2",
    ]
    cfg = load_train_config(None, [*TINY, "steps=4", *overrides])
    loaded, records = run_clip_training(cfg)
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)
    assert [r["step"] for r in records if "text_to_image_R@1" in r] == [2, 4]
    assert 0 <= records[-1]["image_to_text_R@1"] <= records[-1]["image_to_text_R@10"] <= 1
    for name in ("loss.png", "lr.png", "eval.png", "metrics.jsonl", "config.json", "run_info.json"):
        assert (tmp_path / "run" / name).is_file()
    exported = mmlm.load(tmp_path / "run" / "model")
    image = tmp_path / "data" / "images" / "000001.png"
    torch.testing.assert_close(
        exported.encode_image([image]), loaded.encode_image([image]), atol=1e-6, rtol=0
    )
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model_type"] == "clip"


def test_locked_image_tower_does_not_change(tmp_path):
    cfg = load_train_config(None, [*TINY, "steps=3", f"out_dir={tmp_path}", "lock_image=0"])
    torch.manual_seed(cfg.seed)
    from mmlm.models.dual_encoder import DualEncoder

    before = {k: v.clone() for k, v in DualEncoder(cfg.model).visual.state_dict().items()}
    loaded, _ = run_clip_training(cfg)
    after = loaded.model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.model.logit_scale.item() != pytest.approx(cfg.model.logit_scale_init)  # the rest trained


def test_bad_training_config_is_one_line(tmp_path, capsys):
    from mmlm.cli import main

    assert main(["train", "clip", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err
    assert main(["train", "clip", "optim.lr"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["train", "clip", f"out_dir={tmp_path}", "--resume", "latest"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_in_memory_batches_equal_the_image_processor_and_resume_by_position():
    import numpy as np
    from PIL import Image

    from mmlm.processing.image import ImageProcessor, PixelNormalize
    from mmlm.train.memory_data import InMemoryPairs

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(10)]
    processor = ImageProcessor.clip(16)
    data = InMemoryPairs(images, torch.arange(10)[:, None], processor, batch_size=4, seed=3)
    batches = [b for _, b in zip(range(5), data, strict=False)]
    for pixels, ids in batches:  # every batch, normalised, is the processor's output for its ids' images
        assert pixels.dtype == torch.uint8
        expected = processor([images[i] for i in ids[:, 0].tolist()])
        torch.testing.assert_close(PixelNormalize(processor)(pixels), expected, atol=0, rtol=0)
    again = InMemoryPairs(images, torch.arange(10)[:, None], processor, batch_size=4, seed=3)
    again.load_state_dict({"position": 3})
    assert [torch.equal(a[1], b[1]) for a, b in zip(batches[3:], iter(again), strict=False)] == [True, True]


def test_fine_tuning_a_siglip_checkpoint_keeps_its_format(tmp_path):
    import transformers

    from fixtures_models import write_tiny_siglip

    write_tiny_siglip(tmp_path / "siglip")
    manifest = shapes.write_dataset(tmp_path / "data", 32, seed=0, image_size=32)
    overrides = [
        "steps=2",
        "log_every=1",
        "batch_size=8",
        "data.workers=0",
        f"init={tmp_path / 'siglip'}",
        f"out_dir={tmp_path / 'run'}",
    ]
    loaded, records = run_clip_training(load_train_config(None, [*overrides, f"data.source={manifest}"]))
    assert loaded.config.family == "siglip" and len(records) == 2  # trained with the sigmoid loss
    before = mmlm.load(tmp_path / "siglip").model.visual.pos_embed
    assert not torch.equal(before, loaded.model.visual.pos_embed.detach())
    again = transformers.SiglipModel.from_pretrained(tmp_path / "run" / "model")
    torch.testing.assert_close(again.logit_bias.detach().reshape(()), loaded.model.logit_bias.detach())


def test_a_short_run_warms_up_for_a_tenth_of_its_steps_and_reaches_the_peak_lr():
    from mmlm.train.config import OptimConfig
    from mmlm.train.optim import build_scheduler

    def lrs(cfg: OptimConfig, total: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = build_scheduler(opt, cfg, total)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    short = lrs(OptimConfig(lr=1.0), 50)  # default warmup_steps=100, capped at 10% of 50 steps
    assert short[4] == pytest.approx(1.0) and short[3] == pytest.approx(0.8)
    long = lrs(OptimConfig(lr=1.0), 2000)  # a long run keeps its 100-step warmup
    assert long[99] == pytest.approx(1.0) and long[49] == pytest.approx(0.5)
    uncapped = lrs(OptimConfig(lr=1.0, max_warmup_fraction=None), 50)
    assert uncapped[49] == pytest.approx(0.5)


def test_a_warmup_fraction_outside_zero_to_one_is_refused():
    from mmlm.errors import InputError

    with pytest.raises(InputError, match="max_warmup_fraction"):
        load_train_config(None, ["optim.max_warmup_fraction=1.5"])


def tiny_model_and_batches(steps: int):
    """A TINY dual encoder and `steps` batches of uint8 images and token ids, as InMemoryPairs serves them."""
    from dataclasses import replace

    from mmlm.models.dual_encoder import DualEncoder

    cfg = load_train_config(None, [*TINY, f"steps={steps}"])
    torch.manual_seed(0)
    model = DualEncoder(replace(cfg.model, text=replace(cfg.model.text, vocab_size=300)))
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (steps, 16, 3, 16, 16), dtype=torch.uint8, generator=generator)
    ids = torch.randint(1, 300, (steps, 16, 24), generator=generator)
    return cfg, model, list(zip(pixels, ids, strict=True))


def test_uint8_batches_normalised_on_the_device_train_as_float_batches(tmp_path):
    from mmlm.processing.image import ImageProcessor, PixelNormalize
    from mmlm.train.loop import train

    processor = ImageProcessor.clip(16)
    table = torch.from_numpy(processor.value_table())  # the float path: normalised in the loader
    cfg, model, batches = tiny_model_and_batches(3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    as_uint8 = train(cfg, model, iter(batches), tmp_path, normalize=PixelNormalize(processor))
    model.load_state_dict(start)
    floats = [(torch.stack([table[c][p[:, c].long()] for c in range(3)], 1), i) for p, i in batches]
    as_float = train(cfg, model, iter(floats), tmp_path)
    assert len(as_uint8) == 3
    for a, b in zip(as_uint8, as_float, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_compiled_model_trains_to_the_eager_losses(tmp_path, monkeypatch, accumulation):
    from mmlm.models.dual_encoder import DualEncoder

    overrides = [*TINY, "steps=3", f"optim.accumulation={accumulation}", "data.shapes_samples=96"]
    _, eager = run_clip_training(load_train_config(None, [*overrides, f"out_dir={tmp_path / 'eager'}"]))
    compiled_cfg = load_train_config(
        None, [*overrides, "compile=true", "compile_backend=aot_eager", f"out_dir={tmp_path / 'compiled'}"]
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_objects, compile = [], torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda f, **options: compiled_objects.append(f) or compile(f, **options)
    )
    _, compiled = run_clip_training(compiled_cfg)
    assert any(isinstance(f, DualEncoder) for f in compiled_objects)  # the model, not only the loss
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the model's forward and the loss
    assert len(compiled) == 3
    for a, b in zip(compiled, eager, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5, rel=0)


@pytest.mark.cuda
def test_in_memory_batches_are_pinned_and_normalise_on_the_gpu_to_the_float_path():
    from mmlm.processing.image import ImageProcessor, PixelNormalize
    from mmlm.train.memory_data import InMemoryPairs

    images = [shapes.make_sample(i, 0, image_size=16).image for i in range(8)]
    processor = ImageProcessor.clip(16)
    data = InMemoryPairs(images, torch.arange(8)[:, None], processor, batch_size=4, pin_memory=True)
    pixels, ids = next(iter(data))
    assert pixels.is_pinned() and ids.is_pinned() and pixels.dtype == torch.uint8
    on_gpu = PixelNormalize(processor).cuda()(pixels.cuda(non_blocking=True))
    expected = processor([images[i] for i in ids[:, 0].tolist()])
    torch.testing.assert_close(on_gpu.cpu(), expected, atol=1e-6, rtol=0)


@pytest.mark.cuda
def test_training_steps_between_log_steps_never_wait_for_the_gpu(tmp_path, monkeypatch):
    """With fused AdamW on CUDA, steps between log steps make no synchronising call (torch's sync debug mode
    raises on one); log steps read the loss, and may."""
    from dataclasses import replace

    from mmlm.processing.image import ImageProcessor, PixelNormalize
    from mmlm.train import loop

    cfg, model, batches = tiny_model_and_batches(8)
    cfg = replace(cfg, log_every=4, device="cuda")
    steps, optimizer_step = [0], loop._optimizer_step

    def strict_step(*args, **kwargs):
        steps[0] += 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if steps[0] > 1 else "default")  # the first step warms up
        try:
            return optimizer_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop, "_optimizer_step", strict_step)
    pinned = [(p.pin_memory(), i.pin_memory()) for p, i in batches]
    records = loop.train(
        cfg, model, iter(pinned), tmp_path, normalize=PixelNormalize(ImageProcessor.clip(16))
    )
    assert [r["step"] for r in records] == [4, 8] and steps[0] == 8
