"""`make demo` end to end at toy sizes: the summary's figures exist, and they are what the written model scores on
the written evaluation sets (computed by the run, not copied from anywhere)."""

import json
import shutil

import pytest

from mmlm.cli import main
from mmlm.recipes.demo import run_demo
from mmlm.recipes.demo_vlm import VLMDemoBudget

KEYS = (
    "zero_shot_top1", "zero_shot_seen_top1", "retrieval_r1_t2i", "retrieval_r1_i2t", "seed", "steps",
    "vqa_accuracy", "vqa_val_accuracy", "vqa_blind_accuracy", "vqa_text_only_accuracy", "vqa_prior_accuracy",
    "vqa_accuracy_with_captions", "vlm_seed",
    "pope_f1_random", "pope_f1_popular", "pope_f1_adversarial", "pope_yes_ratio_random", "seconds",
)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    budget = VLMDemoBudget(tower_steps=1, pretrain_steps=1, align_steps=1, instruct_steps=2, eval_samples=8,
                           pope_samples=12, batch_size=4)  # fmt: skip
    return out, run_demo(out, steps=3, seed=1, vlm_budget=budget)


@pytest.mark.slow
def test_the_whole_demo_writes_every_figure_with_its_seed(demo):
    out, summary = demo
    assert json.loads((out / "summary.json").read_text()) == summary
    missing = [k for k in KEYS if k not in summary]
    assert not missing, missing
    # 8 toy questions need not cover every type, but each type asked is scored
    assert any(k.startswith("vqa_accuracy_") and 0 <= v <= 1 for k, v in summary.items())
    assert summary["seed"] == summary["vlm_seed"] == 1 and summary["steps"] == 3
    assert summary["zero_shot_classes"] == 64 and summary["zero_shot_heldout_pairs"] == 16
    for key in KEYS:
        if key not in ("seed", "vlm_seed", "steps", "seconds"):
            assert 0 <= summary[key] <= 1, key
    assert (out / "model" / "config.json").is_file() and (out / "vlm" / "config.json").is_file()


@pytest.mark.slow
def test_the_clip_figures_are_what_mmlm_eval_gets_from_the_written_model_and_sets(demo, capsys):
    out, summary = demo
    capsys.readouterr()
    main(["eval", "zeroshot", "--model", str(out / "model"), "--data", str(out / "eval" / "zero_shot"),
          "--templates", str(out / "eval" / "templates.txt"), "--json"])  # fmt: skip
    zero_shot = json.loads(capsys.readouterr().out)
    assert zero_shot["top1"] == pytest.approx(summary["zero_shot_top1"], abs=1e-6)
    main(["eval", "retrieval", "--model", str(out / "model"), "--data", str(out / "eval" / "retrieval.jsonl"),
          "--json"])  # fmt: skip
    retrieval = json.loads(capsys.readouterr().out)
    assert retrieval["text_to_image_R@1"] == pytest.approx(summary["retrieval_r1_t2i"], abs=1e-6)
    assert retrieval["image_to_text_R@1"] == pytest.approx(summary["retrieval_r1_i2t"], abs=1e-6)


@pytest.mark.slow
def test_rescoring_the_written_vlm_gives_the_summarys_figures(demo, tmp_path, capsys):
    out, summary = demo
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    assert main(["demo", "--rescore", "--out", str(copy)]) == 0
    rescored = json.loads((copy / "summary.json").read_text())
    figures = [k for k in summary if k.startswith(("vqa_", "pope_"))]
    assert "vqa_text_only_accuracy" in figures and "vqa_accuracy_with_captions" in figures
    assert {k: rescored[k] for k in figures} == pytest.approx({k: summary[k] for k in figures}, abs=1e-9)
    assert rescored["zero_shot_top1"] == summary["zero_shot_top1"]  # the CLIP's figures are kept


def test_rescoring_a_folder_without_a_demo_vlm_fails_in_one_line(tmp_path, capsys):
    assert main(["demo", "--rescore", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no demo VLM to score" in err and "\n" not in err
