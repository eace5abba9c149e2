"""Training logs users already watch: TensorBoard event files and W&B runs carry metrics.jsonl's figures."""

import json
import sys

import numpy as np
import pytest
from test_train import TINY

from mmlm.errors import InputError
from mmlm.train.config import load_train_config
from mmlm.train.run import run_clip_training
from mmlm.train.vlm_config import vlm_config_from_dict
from mmlm.train.vlm_loop import run_vlm_training


def jsonl_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def expected_scalars(records) -> dict[str, dict[int, float]]:
    """The jsonl figures as TensorBoard stores them: float32, by step."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float):
                out.setdefault(k, {})[r["step"]] = float(np.float32(v))
    return out


def test_clip_run_writes_tensorboard_scalars_equal_to_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_train_config(None, [*TINY, "steps=3", f"out_dir={tmp_path}", "log.tensorboard=true"])
    _, records = run_clip_training(cfg)
    written = jsonl_records(tmp_path)
    assert written == records and [r["step"] for r in written] == [1, 2, 3]
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == {"loss", "lr", "logit_scale", "samples_per_s"}
    assert scalars == expected_scalars(written)


def test_vlm_run_writes_tensorboard_scalars_equal_to_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)
    model = {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
             "lm": {"width": 32, "layers": 1, "heads": 2, "kv_heads": 1, "mlp_dim": 64}, "vocab_size": 300}  # fmt: skip
    stage = {"steps": 2, "train": ["connector"], "data": {"question_types": ["color"], "samples": 16}}
    cfg = vlm_config_from_dict({"model": model, "stages": {"align": stage}, "batch_size": 4, "max_length": 64,
                                "log_every": 1, "eval_samples": 0, "out_dir": str(tmp_path), "device": "cpu",
                                "log": {"tensorboard": True}})  # fmt: skip
    _, records = run_vlm_training(cfg)
    written = jsonl_records(tmp_path)
    assert [r["stage"] for r in written] == ["align", "align"]  # text stays in the jsonl only
    scalars = tensorboard_scalars(tmp_path)
    assert {"loss", "loss_image", "lr"} <= set(scalars)
    assert scalars == expected_scalars([{k: v for k, v in r.items() if k != "stage"} for r in written])


@pytest.mark.parametrize(
    ("option", "section", "package"),
    [
        ("log.wandb=proj", {"wandb": "proj"}, "wandb"),
        ("log.tensorboard=true", {"tensorboard": True}, "tensorboard"),
    ],
)
def test_a_missing_logging_package_stops_at_start_up_with_one_line(
    option, section, package, monkeypatch, capsys
):
    from mmlm.cli import main

    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    name = option.split("=")[0]
    expected = f"{name} needs the {package} package: pip install {package} (or pip install 'mmlm[logging]')"
    with pytest.raises(InputError) as error:
        load_train_config(None, [option])
    assert str(error.value) == expected
    with pytest.raises(InputError) as error:
        vlm_config_from_dict({"log": section})
    assert str(error.value) == expected
    assert main(["train", "clip", option]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_a_bad_wandb_setting_names_the_field():
    with pytest.raises(InputError, match=r"^log.wandb: expected a W&B project name, got 3$"):
        load_train_config(None, ["log.wandb=3"])
    with pytest.raises(InputError, match=r"^log.tensorboard: expected true or false, got 'yes'$"):
        load_train_config(None, ["log.tensorboard=yes"])


def test_offline_wandb_run_writes_its_run_folder_with_the_figures(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_train_config(None, [*TINY, "steps=2", f"out_dir={tmp_path}", "log.wandb=mmlm-test"])
    _, records = run_clip_training(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and len(list(runs[0].glob("run-*.wandb"))) == 1
    data = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records; values stored as JSON text
    assert b"mmlm-test" in data
    for record in records:
        for key in ("loss", "logit_scale", "samples_per_s"):
            assert key.encode() in data and json.dumps(record[key]).encode() in data
