"""docs/recipes.md stays true: the configs it names load with `mmlm train vlm --config`'s loader, its
`mmlm budget --train` commands print what it quotes, and a scaled-down rehearsal of each recipe runs end to end
on the CPU, the LoRA config in one process and the FSDP config under torchrun on 2 gloo processes.

The rehearsal starts from a tiny random CLIP folder and a tiny random Llama folder, not from a tiny LLaVA folder
(fixtures_vlm.write_tiny_llava): a VLM run starts from a tower and an LM (`model.vision_init`, `model.lm_init`),
as the recipes do from CLIP ViT-L/14-336 and Vicuna-7B.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmlm
from fixtures_lm import write_tiny_lm
from fixtures_models import write_tiny_clip
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.train.config import read_config_file
from mmlm.train.vlm_config import load_vlm_train_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "docs" / "recipes.md"
LORA, FSDP = "docs/configs/llava-7b-lora.yaml", "docs/configs/llava-7b-fsdp.yaml"


def recipe_configs() -> list[str]:
    return sorted(set(re.findall(r"docs/configs/[\w.-]+\.yaml", RECIPES.read_text())))


def budget_blocks() -> list[tuple[list[str], str]]:
    """(arguments, quoted output) of every console block in docs/recipes.md that runs `mmlm budget --train`."""
    blocks = re.findall(r"```console\n\$ mmlm (budget --train[^\n]*)\n(.*?)```", RECIPES.read_text(), re.S)
    return [(shlex.split(command), output) for command, output in blocks]


def test_recipes_name_both_configs():
    assert recipe_configs() == [FSDP, LORA]


def _named_paths(raw: dict) -> tuple[list[str], list[str]]:
    """Return (folders, files) a raw config names: checkpoints and image folders, data files."""
    folders = [raw["model"][key] for key in ("vision_init", "lm_init", "tokenizer") if raw["model"].get(key)]
    files = []
    for stage in raw["stages"].values():
        data = stage.get("data", {})
        files += [data[key] for key in ("source", "text_source") if data.get(key) not in (None, "shapes")]
        folders += [data["image_folder"]] if data.get("image_folder") else []
    return folders, files


EXPECTED = {  # what each recipe says it does
    LORA: {"parallel": "ddp", "instruct": ["connector", "lora"], "samples_per_step": 128},
    FSDP: {"parallel": "fsdp", "instruct": ["connector", "lm"], "samples_per_step": 128 // 8},  # per GPU
}


@pytest.mark.parametrize("name", [LORA, FSDP])
def test_recipe_config_loads_once_its_checkpoints_and_data_exist(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' paths are relative to the folder a run starts in
    with pytest.raises(InputError, match="not found|is not a folder"):  # the loader does check them
        load_vlm_train_config(REPO / name)
    folders, files = _named_paths(read_config_file(REPO / name))
    assert len(folders) == 4 and len(files) == 2
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for file in files:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text("[]")
    cfg = load_vlm_train_config(REPO / name)
    expected = EXPECTED[name]
    assert cfg.model.lm_init == "checkpoints/vicuna-7b-v1.5" and cfg.model.connector.kind == "mlp"
    assert list(cfg.stages) == ["align", "instruct"] and cfg.stages["align"].train == ["connector"]
    assert cfg.stages["instruct"].train == expected["instruct"] and cfg.parallel == expected["parallel"]
    instruct = cfg.stages["instruct"]
    assert cfg.batch_size * instruct.optim.accumulation == expected["samples_per_step"]
    assert cfg.grad_checkpointing and cfg.max_length == 2048 and cfg.precision == "auto"


def test_budget_commands_in_recipes_print_the_quoted_figures(monkeypatch, capsys):
    blocks = budget_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(REPO)  # the commands name docs/configs/... relative to the repository
    for args, quoted in blocks:
        assert main(args) == 0
        assert capsys.readouterr().out == quoted, " ".join(args)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A tiny CLIP folder, a tiny Llama folder, and LLaVA-format JSON over 6 images: captions.json, every record
    with an image (a stage that trains only the connector needs an image in every batch), and instruct.json, the
    same records and one text-only record, as instruction mixes have."""
    root = tmp_path_factory.mktemp("recipe-parts")
    write_tiny_clip(root / "clip")
    write_tiny_lm(root / "lm")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.jpg")
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": f"a pattern of noise, number {i}"}]})  # fmt: skip
    (root / "captions.json").write_text(json.dumps(records))
    text = {"id": "text", "conversations": [{"from": "human", "value": "Say hello."},
                                            {"from": "gpt", "value": "hello"}]}  # fmt: skip
    (root / "instruct.json").write_text(json.dumps([*records[:3], text, *records[3:]]))
    return root


def rehearsal_overrides(parts: Path, out_dir: Path, instruct: str) -> list[str]:
    """Overrides that shrink a recipe to the tiny parts and data: 2 steps a stage, no accumulation."""
    overrides = [f"model.vision_init={parts / 'clip'}", f"model.lm_init={parts / 'lm'}", "batch_size=2",
                 "max_length=64", "data.workers=0", "log_every=1", f"out_dir={out_dir}"]  # fmt: skip
    for stage, source in (("align", "captions.json"), ("instruct", instruct)):
        overrides += [f"stages.{stage}.steps=2", f"stages.{stage}.optim.accumulation=1",
                      f"stages.{stage}.data.source={parts / source}",
                      f"stages.{stage}.data.image_folder={parts / 'images'}"]  # fmt: skip
    return overrides


def start_blocks(parts: Path) -> dict[str, torch.Tensor]:
    """The ViT's and the LM's block weights as the run starts from them, named as in the trained VLM."""
    tower = mmlm.load(parts / "clip").model.visual.state_dict()
    lm = mmlm.load(parts / "lm").model.state_dict()
    weights = {f"vision.{k}": v for k, v in tower.items()} | {f"lm.{k}": v for k, v in lm.items()}
    return {k: v for k, v in weights.items() if ".blocks." in k}


def moved_blocks(parts: Path, run: Path) -> set[str]:
    """The block weights of the run's exported model that differ from the ones it started from."""
    trained = mmlm.load(run / "model").model.state_dict()
    return {k for k, v in start_blocks(parts).items() if not torch.equal(v, trained[k])}


def check_records(run: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["align"] * 2 + ["instruct"] * 2
    assert all(math.isfinite(r["loss"]) for r in records)
    assert not [key for r in records for key in r if key.startswith("skipped_")]  # every record was usable


def test_lora_recipe_rehearsal_trains_the_connector_and_lm_attention_only(parts, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            ["train", "vlm", "--config", str(REPO / LORA), *rehearsal_overrides(parts, run, "instruct.json")]
        )
        == 0
    )
    check_records(run)
    assert (run / "adapter-instruct" / "adapter_model.safetensors").is_file()
    attention = {k for k in start_blocks(parts) if k.startswith("lm.") and ".attn." in k}
    assert attention and moved_blocks(parts, run) == attention  # q, k, v, out merged; MLPs, norms and ViT not


@pytest.mark.slow  # a torchrun launch of 2 processes, ~10 s on 2 cores
def test_fsdp_recipe_rehearsal_under_torchrun_trains_the_whole_lm_and_not_the_vit(parts, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmlm", "train", "vlm", "--config", str(REPO / FSDP), "parallel=fsdp",
               *rehearsal_overrides(parts, run, "captions.json")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    check_records(run)
    assert json.loads((run / "config.json").read_text())["parallel"] == "fsdp"
    lm = {k for k in start_blocks(parts) if k.startswith("lm.")}
    assert lm and moved_blocks(parts, run) == lm  # every LM block weight trained, no ViT weight
