"""`mmlm study fusion`: each style's run differs from the demo's only in the connector; table, plot and bad input."""

import json

import pytest

from mmlm.cli import main
from mmlm.recipes.study import STYLES, plot, style_config, table


@pytest.mark.parametrize("kind", list(STYLES))
def test_each_style_is_the_demo_recipe_with_its_connector(kind, tmp_path):
    cfg = style_config(kind, tmp_path, tmp_path / "tower", steps=30, eval_samples=10)
    assert cfg.model.connector.kind == kind
    assert cfg.stages["instruct"].steps == 30 and cfg.stages["instruct"].vision_from_step == 20
    assert cfg.out_dir == str(tmp_path / kind) and cfg.eval_samples == 10
    # unified has no connector weights, so its alignment stage trains the LM (the image codes' embeddings)
    assert cfg.stages["align"].train == (["lm"] if kind == "unified" else ["connector"])
    assert cfg.model.lm.layers == 2 and cfg.model.vision.image_size == 32  # the same backbone for every style


def test_table_and_plot_from_results(tmp_path):
    rows = [{"style": s, "visual_tokens": t, "parameters_between": 10, "train_seconds": 1.0, "prefill_ms": 2.0,
             "decode_tokens_per_s": 3.0, "vqa_accuracy": a, "vqa_accuracy_count": 0.5}
            for s, t, a in (("mlp", 16, 0.4), ("linear", 16, 0.4), ("qformer", 8, 0.3))]  # fmt: skip
    text = table(rows)
    assert text.splitlines()[2].startswith("| mlp | 16 | 10 |") and "| 0.400 | 0.500 | nan |" in text
    assert plot(rows, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_study_input_is_one_line(tmp_path, capsys):
    assert main(["study", "fusion", "--styles", "mlp,blip"]) == 2
    assert "--styles: unknown ['blip']" in capsys.readouterr().err
    assert main(["study", "fusion", "--vision", str(tmp_path), "--styles", "mlp"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert main(["study", "fusion", "--measure-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no study results" in err and "\n" not in err.strip()
    (tmp_path / "results.json").write_text(json.dumps([]))
    assert main(["study", "fusion", "--measure-only", "--out", str(tmp_path)]) == 0
