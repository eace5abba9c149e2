"""`mmlm score BENCHMARK predictions.jsonl`: the names users type pick their official metric and parser."""

import json

import pytest

from mmlm.cli import main
from mmlm.cli.score import resolve_metric
from mmlm.eval.benchmarks import BENCHMARK_SCORING
from mmlm.eval.metrics import METRICS
from mmlm.eval.parsers import PARSERS

EXPECTED = {
    "vqav2": ("vqa_accuracy", "vqa"),
    "textvqa": ("vqa_accuracy", "vqa"),
    "docvqa": ("anls", "raw"),
    "infovqa": ("anls", "raw"),
    "chartqa": ("relaxed_accuracy", "raw"),
    "pope": ("pope", "yes_no"),
    "mmmu": ("mmmu", "raw"),
    "mmbench": ("multiple_choice", "option_letter"),
    "coco-caption": ("caption", "caption"),
}


def _score(tmp_path, capsys, name, rows):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    status = main(["score", name, str(path)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


@pytest.mark.parametrize(("name", "expected"), EXPECTED.items())
def test_each_benchmark_name_picks_its_official_metric_and_parser(name, expected):
    assert resolve_metric(name) == expected
    assert expected[0] in METRICS and expected[1] in PARSERS
    assert resolve_metric(name, "number") == (expected[0], "number")  # --parser still overrides


def test_every_listed_benchmark_is_known():
    assert set(BENCHMARK_SCORING) == set(EXPECTED)


HUMANS = ["2"] * 3 + ["3"] * 7  # three of ten annotators say "2": VQA accuracy 0.9 (leave-one-out mean)


@pytest.mark.parametrize(
    ("name", "row", "figure", "value"),
    [
        ("vqav2", {"prediction": "Two\nbecause I counted", "answers": HUMANS}, "vqa_accuracy", 0.9),
        ("textvqa", {"prediction": "two", "answers": HUMANS}, "vqa_accuracy", 0.9),
        ("chartqa", {"prediction": " 51 ", "answers": ["50"]}, "relaxed_accuracy", 1.0),  # within 5%
        # the whole response is compared, as Pix2Struct's script does: a reasoning line after it is wrong
        ("chartqa", {"prediction": "50\nsince the bar reads 50", "answers": ["50"]}, "relaxed_accuracy", 0.0),
        ("pope", {"prediction": "No, there is not.", "label": "no"}, "accuracy", 1.0),
        (
            "mmmu",
            {"prediction": "The answer is (B).", "choices": ["cat", "dog"], "label": "B"},
            "accuracy",
            1.0,
        ),
        # MMMU's parser finds no letter in a lower-case "b" (it would draw one at random): scored wrong
        ("mmmu", {"prediction": "b", "choices": ["cat", "dog"], "label": "B"}, "accuracy", 0.0),
        # an open question (no choices): MMMU's eval_open on the candidates after its key phrases
        ("mmmu", {"prediction": "First 3 + 4.\nSo the total is 7.00", "answers": ["7"]}, "accuracy", 1.0),
        ("mmmu", {"prediction": "The answer is 8", "answers": ["7"]}, "accuracy", 0.0),
        ("mmbench", {"prediction": "dog", "choices": ["cat", "dog"], "label": "B"}, "accuracy", 1.0),
        ("docvqa", {"prediction": "Invoice No\n42", "answers": ["invoice no 42"]}, "anls", 1.0),
    ],
)
def test_score_by_benchmark_name(tmp_path, capsys, name, row, figure, value):
    status, out, _ = _score(tmp_path, capsys, name, [{"id": 1, **row}])
    result = json.loads(out)
    assert status == 0 and (result["metric"], result["parser"]) == EXPECTED[name]
    assert result["metrics"][figure] == pytest.approx(value)


def test_an_unknown_name_is_one_line_listing_the_known_ones_and_exit_2(tmp_path, capsys):
    status, out, err = _score(tmp_path, capsys, "vqa2", [{"id": 1, "prediction": "a", "answers": ["a"]}])
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("mmlm: error: unknown metric 'vqa2'")
    for known in [*METRICS, *EXPECTED, "shapes-vqa"]:
        assert known in err
