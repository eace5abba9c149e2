"""VLM training (`mmlm train vlm`): what each stage trains, LoRA, ViT unfreezing, data mixing, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmlm
from mmlm.cli import main
from mmlm.data.synthetic.shapes import split_combinations
from mmlm.errors import InputError
from mmlm.layers.lora import LoRALinear
from mmlm.train.mixing import MULTIMODAL, TEXT, MixingSampler, corpus_texts
from mmlm.train.vlm_config import StageData, vlm_config_from_dict
from mmlm.train.vlm_loop import (
    IntervalLosses,
    accumulate_gradients,
    batch_loss,
    build_tokenizer,
    build_vlm,
    run_vlm_training,
)

TINY_MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
}
ALIGN = {"steps": 3, "train": ["connector"], "data": {"question_types": ["caption", "color"], "samples": 32}}
INSTRUCT = {"steps": 3, "train": ["connector", "lm"], "data": {"samples": 32}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A BPE trained once on the tiny runs' questions, answers and sentences (the runs then skip training one)."""
    out = tmp_path_factory.mktemp("tokenizer")
    cfg = tiny_config(out, {"instruct": INSTRUCT})
    pairs, _ = split_combinations(0)
    data = [StageData(samples=200, multimodal_fraction=0.5, text_source="shapes", text_samples=200)]
    return str(build_tokenizer(cfg, out, lambda: corpus_texts(data, 0, pairs)))


@pytest.fixture(autouse=True)
def no_plots(request, monkeypatch):
    """Skip the PNG plots (about a second per run) except in the test that checks them."""
    if "plots" not in request.node.name:
        monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
        monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)


def tiny_config(out: Path, stages: dict, tokenizer: str | None = None, **settings):
    data = {"model": {**TINY_MODEL, "tokenizer": tokenizer}, "stages": stages, "batch_size": 4, "max_length": 64, "log_every": 1,
            "eval_samples": 0, "out_dir": str(out), "device": "cpu", **settings}  # fmt: skip
    return vlm_config_from_dict(data)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict, prefix: str = "") -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_stage_one_trains_only_the_connector(tmp_path, tokenizer):
    cfg = tiny_config(tmp_path, {"align": ALIGN}, tokenizer)
    initial = weights(build_vlm(cfg, Path(tokenizer))[0])
    loaded, records = run_vlm_training(cfg)
    final = weights(loaded.model)
    assert changed(initial, final) == {k for k in initial if k.startswith("connector.")}
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss_image" in r for r in records)


def test_a_text_only_batch_in_a_connector_only_stage_trains_on(tmp_path, tokenizer):
    """Text-only batches give the connector no gradient path: the step must still run (zero gradients), not
    fail in backward; with every batch text-only the connector only decays and the LM stays as it was."""
    text_only = {**ALIGN, "data": {"multimodal_fraction": 0.0, "text_source": "shapes", "text_samples": 32}}
    cfg = tiny_config(tmp_path, {"align": text_only}, tokenizer)
    initial = weights(build_vlm(cfg, Path(tokenizer))[0])
    loaded, records = run_vlm_training(cfg)
    final = weights(loaded.model)
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss_text" in r for r in records)
    assert changed(initial, final) <= {k for k in initial if k.startswith("connector.")}
    for key in changed(initial, final):  # AdamW's decoupled decay on a zero gradient: w·(1 − lr·wd) each step
        assert torch.all(final[key].abs() <= initial[key].abs())


def test_stage_two_trains_the_lm_and_connector_but_not_the_vit(tmp_path, tokenizer):
    cfg = tiny_config(tmp_path, {"align": ALIGN, "instruct": INSTRUCT}, tokenizer)
    initial = weights(build_vlm(cfg, Path(tokenizer))[0])
    final = weights(run_vlm_training(cfg)[0].model)
    assert not changed(initial, final, "vision.")
    assert changed(initial, final, "lm.blocks.0.") and changed(initial, final, "connector.")


def test_lora_stage_trains_only_lora_then_merges(tmp_path, tokenizer):
    stage = {**INSTRUCT, "train": ["lora"]}
    cfg = tiny_config(tmp_path, {"instruct": stage}, tokenizer, lora={"rank": 2, "alpha": 4, "targets": ["q", "v", "down"], "save_adapter": True})  # fmt: skip
    initial = weights(build_vlm(cfg, Path(tokenizer))[0])
    loaded, _ = run_vlm_training(cfg)
    final = weights(loaded.model)
    assert not any(isinstance(m, LoRALinear) for m in loaded.model.modules())  # merged back into nn.Linear
    assert set(final) == set(initial)
    # merging changed exactly the adapted layers: fused qkv (q and v rows only) and mlp.down
    assert changed(initial, final) == {
        f"lm.blocks.{i}.{n}.weight" for i in (0, 1) for n in ("attn.qkv", "mlp.down")
    }
    q, kv = 2 * 16, 1 * 16  # heads × head_dim, kv_heads × head_dim
    k_rows = slice(q, q + kv)
    assert torch.equal(
        initial["lm.blocks.0.attn.qkv.weight"][k_rows], final["lm.blocks.0.attn.qkv.weight"][k_rows]
    )
    adapter = json.loads((tmp_path / "adapter-instruct" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 4


def test_vit_unfreezes_at_the_configured_step(tmp_path, tokenizer):
    # three blocks, features from the second (-2): "the last block" is block 1, the last one that feeds them
    model = {**TINY_MODEL, "vision": {**TINY_MODEL["vision"], "layers": 3}}
    stage = {**INSTRUCT, "steps": 4, "vision_layers": 1, "vision_from_step": 2}
    cfg = tiny_config(tmp_path, {"instruct": stage}, tokenizer, checkpoint_every=1, model={**model, "tokenizer": tokenizer})  # fmt: skip
    initial = weights(build_vlm(cfg, Path(tokenizer))[0])
    final = weights(run_vlm_training(cfg)[0].model)
    at = {s: load_file(str(tmp_path / "checkpoints" / f"step-{s:07d}" / "model.safetensors")) for s in (2, 3)}
    assert not changed(initial, at[2], "vision.")  # two updates done, the ViT still frozen
    assert changed(initial, at[3], "vision.")  # the third update (stage step 2) moves it
    assert changed(initial, final, "vision.") == {
        k for k in initial if k.startswith("vision.transformer.blocks.1.")
    }


def test_mixing_sampler_ratio_determinism_and_resume():
    sampler = MixingSampler({MULTIMODAL: 50, TEXT: 30}, 0.7, 32, seed=3)
    batches = [sampler.next_batch() for _ in range(100)]
    share = np.mean([s == MULTIMODAL for b in batches for s, _ in b])
    assert abs(share - 0.7) < 0.02  # 3200 draws: the standard error is 0.008
    again = MixingSampler({MULTIMODAL: 50, TEXT: 30}, 0.7, 32, seed=3)
    assert [again.next_batch() for _ in range(100)] == batches
    again = MixingSampler({MULTIMODAL: 50, TEXT: 30}, 0.7, 32, seed=3)
    # each source is read epoch by epoch: every sample once before any repeats
    first_epoch = [i for b in batches for s, i in b if s == TEXT][:30]
    assert sorted(first_epoch) == list(range(30))
    for _ in range(60):
        again.next_batch()  # a second run stopped after 60 batches ...
    resumed = MixingSampler({MULTIMODAL: 50, TEXT: 30}, 0.7, 32, seed=3)
    resumed.load_state_dict(again.state_dict())  # ... resumes from its state alone
    assert [resumed.next_batch() for _ in range(40)] == batches[60:]
    assert {s for s, _ in MixingSampler({MULTIMODAL: 50}, 1.0, 8, seed=0).next_batch()} == {MULTIMODAL}


def test_losses_are_logged_per_modality_with_plots(tmp_path, tokenizer):
    stage = {**INSTRUCT, "data": {"samples": 32, "multimodal_fraction": 0.5, "text_source": "shapes", "text_samples": 32}}  # fmt: skip
    _, records = run_vlm_training(tiny_config(tmp_path, {"instruct": stage}, tokenizer, batch_size=8))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all("loss_image" in r and "loss_text" in r for r in lines)
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in lines)
    for r in lines:  # the overall loss is the token-weighted mean of the two
        assert min(r["loss_image"], r["loss_text"]) <= r["loss"] <= max(r["loss_image"], r["loss_text"])
    assert (tmp_path / "loss_modality.png").is_file() and (tmp_path / "loss.png").is_file()


class SumLosses(torch.nn.Module):
    """Stands in for RowLosses: a loss per row from one weight, so a step costs next to nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, labels, *rest) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight * input_ids.float().sum(1), torch.ones(len(input_ids), dtype=torch.long)


def slow_batches(seconds: float):
    """Yield the same two-row text batch forever, each after `seconds` of waiting (a DataLoader falling behind)."""
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": ids, "pixel_values": None, "audio_features": None,
             "image_frames": None, "image_sizes": None, "images_per_sample": torch.zeros(2, dtype=torch.long),
             "audio_per_sample": torch.zeros(2, dtype=torch.long)}  # fmt: skip
    while True:
        time.sleep(seconds)
        yield batch


def test_data_wait_fraction_is_the_share_of_time_spent_drawing_batches():
    net, cpu = SumLosses(), torch.device("cpu")
    fractions = {}
    for wait in (0.0, 0.05):
        interval = IntervalLosses()
        accumulate_gradients(net, slow_batches(wait), 4, cpu, False, "token", interval)
        time.sleep(0.05)  # the optimiser step and logging: time that is not waiting for data
        fractions[wait] = interval.figures()["data_wait_fraction"]
    # 0.2 s of waiting in about 0.25 s; without waiting, only the generator's own few microseconds
    assert 0.6 < fractions[0.05] <= 1 and 0 <= fractions[0.0] < 0.1
    assert interval.samples == 8 and net.weight.grad is not None


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tokenizer):
    stages = {"align": ALIGN, "instruct": {**INSTRUCT, "steps": 4, "train": ["connector", "lora"]}}
    straight = tiny_config(tmp_path / "straight", stages, tokenizer, checkpoint_every=2, lora={"rank": 2, "dropout": 0.1})  # fmt: skip
    final = weights(run_vlm_training(straight)[0].model)
    # resume a fresh run from the straight run's step-4 checkpoint (inside the LoRA stage, after one of its steps)
    resumed_cfg = tiny_config(tmp_path / "resumed", stages, tokenizer, lora={"rank": 2, "dropout": 0.1})
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-0000004"
    loaded, records = run_vlm_training(resumed_cfg, resume=str(checkpoint))
    assert not changed(final, weights(loaded.model))
    straight_losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["loss"] for r in records] == straight_losses


def test_grad_checkpointing_run_logs_the_same_losses(tmp_path, tokenizer):
    runs = [run_vlm_training(tiny_config(tmp_path / str(on), {"instruct": INSTRUCT}, tokenizer,
                                         grad_checkpointing=on)) for on in (False, True)]  # fmt: skip
    (plain, plain_records), (checkpointed, records) = runs
    assert (
        checkpointed.model.lm.grad_checkpointing and checkpointed.model.vision.transformer.grad_checkpointing
    )
    assert not plain.model.lm.grad_checkpointing
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in plain_records], rel=1e-5)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    # a resumed run logs the steps after its checkpoint again; the later line wins
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


@pytest.mark.slow
def test_resume_after_kill_9_through_the_cli(tmp_path, tokenizer):
    stages = {
        "align": {**ALIGN, "steps": 20},
        "instruct": {**INSTRUCT, "steps": 100, "train": ["connector", "lora"]},
    }
    config = tiny_config(tmp_path, stages, tokenizer)  # checked here, written for the CLI below
    data = {"model": {**TINY_MODEL, "tokenizer": tokenizer}, "stages": stages, "batch_size": 4, "max_length": 64,
            "log_every": 1, "eval_samples": 0, "checkpoint_every": 10, "lora": {"rank": 2, "dropout": 0.1}}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(data))

    def command(run: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mmlm", "train", "vlm", "--config", str(tmp_path / "train.json"),
                f"out_dir={tmp_path / run}", *extra]  # fmt: skip

    subprocess.run(command("straight"), check=True, capture_output=True)
    victim = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    killed_at = json.loads(latest.read_text())["step"]
    subprocess.run(command("killed", "--resume", "latest"), check=True, capture_output=True)
    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "killed")
    assert killed_at < config.total_steps and len(straight) == config.total_steps
    assert resumed == straight  # bit-identical on CPU: weights, optimiser, schedule, sampler and RNG restored
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("straight", "killed"))
    assert not changed(a, b)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, tokenizer):
    stages = {
        "align": {**ALIGN, "steps": 4},
        "instruct": {**INSTRUCT, "steps": 30, "train": ["connector", "lora"]},
    }
    data = {"model": {**TINY_MODEL, "tokenizer": tokenizer}, "stages": stages, "batch_size": 4, "max_length": 64,
            "log_every": 1, "eval_samples": 0, "lora": {"rank": 2, "dropout": 0.1}}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(data))

    def command(run: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mmlm", "train", "vlm", "--config", str(tmp_path / "train.json"),
                f"out_dir={tmp_path / run}", *extra]  # fmt: skip

    subprocess.run(command("straight"), check=True, capture_output=True)
    victim = subprocess.Popen(
        command("stopped"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:  # inside the LoRA stage
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 143 and "Traceback" not in err, err
    stopped_at = json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())["step"]
    assert f"mmlm: SIGTERM: stopped after step {stopped_at};" in err and 6 <= stopped_at < 34
    subprocess.run(command("stopped", "--resume", "latest"), check=True, capture_output=True)
    assert losses_by_step(tmp_path / "stopped") == losses_by_step(tmp_path / "straight")
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("straight", "stopped"))
    assert not changed(a, b)


@pytest.mark.slow
def test_training_loss_falls_on_a_tiny_shapes_set(tmp_path, tokenizer):
    stage = {"steps": 24, "train": ["connector", "lm"], "optim": {"lr": 1e-2, "warmup_steps": 4},
             "data": {"samples": 16, "question_types": ["color", "presence"]}}  # fmt: skip
    _, records = run_vlm_training(
        tiny_config(tmp_path, {"instruct": stage}, tokenizer, batch_size=8, log_every=5)
    )
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('stages.align.train=["vision"]', "stages.align.train: expected a non-empty list"),
        ('stages.instruct.train=["lm","lora"]', "choose 'lm'"),
        ("stages.instruct.data.multimodal_fraction=1.5", "multimodal_fraction: expected a number in [0, 1]"),
        ("stages.instruct.data.multimodal_fraction=0.5", "text_source: needed"),
        ("stages.align.vision_from_step=500", "vision_from_step: expected a step in [0, 100)"),
        ("stages.align.steps=0", "stages.align.steps: expected a positive integer"),
        ("batch_size=0", "batch_size: expected a positive integer"),
        ("stages.instruct.data.source=missing.json", "missing.json not found"),
        ('stages.align.data.question_types=["weather"]', "question_types: expected a list"),
        ("precision=fp8", "precision: expected one of"),
        ("loss_average=batch", "loss_average: expected 'token' or 'sample'"),
        ("grad_checkpointing=2", "grad_checkpointing: expected true or false, got 2"),
        ("stages.align.optim.lr=fast", "optim.lr"),
        ("model.vision_init=/no/such/folder", "model.vision_init: /no/such/folder is not a folder"),
        ("stages=[]", "stages: expected a mapping"),
    ],
)
def test_bad_config_values_are_one_line_errors(override, message, capsys):
    assert main(["train", "vlm", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmlm: error: ") and message in err and "\n" not in err


def test_batch_loss_averages_tokens_or_samples():
    # a caption, a word, a text-only row
    row_loss, row_tokens = torch.tensor([6.0, 1.0, 0.0]), torch.tensor([3, 1, 0])
    assert batch_loss(row_loss, row_tokens, "token").item() == pytest.approx(7 / 4)
    assert batch_loss(row_loss, row_tokens, "sample").item() == pytest.approx((6 / 3 + 1 / 1) / 2)
    assert batch_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long), "sample").item() == 0


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["train", "vlm", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_vlm(tmp_path_factory, tokenizer) -> Path:
    """A tiny VLM trained for 3 steps: the folder a run can go on from (model.vlm_init)."""
    out = tmp_path_factory.mktemp("base_vlm")
    run_vlm_training(tiny_config(out, {"instruct": INSTRUCT}, tokenizer))[0].save_pretrained(out / "vlm")
    return out / "vlm"


def going_on(out: Path, folder: Path, **model):
    """A tiny run whose model comes from the VLM `folder`, with `model` settings on top."""
    data = {"model": {**TINY_MODEL, "vlm_init": str(folder), **model}, "stages": {"instruct": INSTRUCT},
            "batch_size": 4, "max_length": 96, "eval_samples": 0, "out_dir": str(out), "device": "cpu"}  # fmt: skip
    return vlm_config_from_dict(data)


def test_a_run_goes_on_from_a_vlm_folder(tmp_path, trained_vlm):
    base = weights(mmlm.load(trained_vlm).model)
    cfg = going_on(tmp_path, trained_vlm)
    assert build_tokenizer(cfg, tmp_path, lambda: []) == trained_vlm  # its tokenizer and chat template
    model, processor = build_vlm(cfg, trained_vlm)
    started = weights(model)
    assert set(started) == set(base) and not changed(base, started)  # tower, connector and LM as saved
    assert processor.max_length == 96  # the LM's rotary positions reach past the 64 it was trained at
    other = weights(
        build_vlm(going_on(tmp_path, trained_vlm, connector={"kind": "pixel_shuffle"}), trained_vlm)[0]
    )
    assert not changed(base, other, "lm.") and not changed(base, other, "vision.")
    assert {k for k in other if k.startswith("connector.")} == {"connector.proj.weight"}  # a new connector


def test_vlm_init_takes_a_vlm_folder_alone(tmp_path, trained_vlm, model_dir):
    with pytest.raises(InputError, match="leave vision_init and lm_init unset"):
        going_on(tmp_path, trained_vlm, vision_init=str(model_dir))
    with pytest.raises(InputError, match="is not a vision-language model folder"):
        build_vlm(going_on(tmp_path, model_dir), trained_vlm)
