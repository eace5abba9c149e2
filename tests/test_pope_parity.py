"""POPE's five figures, overall and per split, against a transcription of its official evaluate.py, run.

The official script (RUCAIBox/POPE, LLaVA's eval_pope.py) is not on PyPI and its license could not be
established, so `tests/fixtures/reference/pope_evaluate.py` restates it step by step (docs/parity.md). The
responses are generated: yes/no phrasings, "No, there is not.", free text, empty strings, mixed case and
punctuation, each split with its own yes-bias, at several label balances.
"""

import importlib.util
import random
from pathlib import Path

import pytest

from fixtures_answers import YES_NO, free_text
from mmlm.eval.metrics import METRICS
from mmlm.eval.parsers import yes_no
from mmlm.eval.tasks import Sample

_SPEC = importlib.util.spec_from_file_location(
    "pope_evaluate", Path(__file__).parent / "fixtures" / "reference" / "pope_evaluate.py"
)
OFFICIAL = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(OFFICIAL)

SPLITS = ("random", "popular", "adversarial")
FIGURES = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# beyond YES_NO: where the rule is easy to get wrong (case, commas, tabs, a "." with no space, a negation word
# glued to punctuation, "not" after the first sentence, "no" inside a word)
EDGES = ["No,there is", "NO.", "Not.", "not sure", "Yes, no doubt.", "no?", "Yes. No.", "yes.no", "...", " ",
         "\tno", "no\t", "Nobody", "knot", "It is not there", "Yes, but not clearly", "no,", ",no", "Nope.",
         "Yes; no", "There is one. It is not red.", "N o", "no  no", "YES, there is not."]  # fmt: skip


def response(rng: random.Random, yes_bias: float) -> str:
    """Return one response: a yes-leaning or no-leaning phrasing, an edge case, free text or an empty one."""
    roll = rng.random()
    if roll < 0.55:
        leaning = [r for r in YES_NO if yes_no(r) == ("yes" if rng.random() < yes_bias else "no")]
        text = rng.choice(leaning)
    elif roll < 0.75:
        text = rng.choice(EDGES)
    elif roll < 0.95:
        text = free_text(rng)
    else:
        text = ""
    return rng.choice([text, text, text.upper(), text.lower(), f" {text}", f"{text}!"])


def pope_set(n: int, yes_share: float, seed: int) -> tuple[list[str], list[Sample]]:
    """Return (responses, samples): n per split, labels "yes" with probability yes_share."""
    rng = random.Random(seed)
    responses, samples = [], []
    for split, yes_bias in zip(SPLITS, (0.5, 0.7, 0.85), strict=True):
        for i in range(n):
            label = "yes" if rng.random() < yes_share else "no"
            samples.append(Sample(f"{split}-{i}", "q", label=label, type=split, meta={"pope_split": split}))
            responses.append(response(rng, yes_bias))
    return responses, samples


@pytest.mark.parametrize(("yes_share", "seed"), [(0.5, 0), (0.5, 1), (0.2, 2), (0.8, 3), (0.05, 4), (1.0, 5)])
def test_pope_figures_equal_the_official_script_per_split(yes_share, seed):
    responses, samples = pope_set(1000, yes_share, seed)
    summary, per_sample = METRICS["pope"](responses, samples)
    labels = [s.label for s in samples]
    official = OFFICIAL.evaluate(responses, labels)
    for name in FIGURES:
        assert summary[name] == pytest.approx(official[name], abs=1e-12, rel=0), name
    for k, split in enumerate(SPLITS):
        rows = slice(k * 1000, (k + 1) * 1000)
        official = OFFICIAL.evaluate(responses[rows], labels[rows])
        for name in FIGURES:
            assert summary[f"{name}_{split}"] == pytest.approx(official[name], abs=1e-12, rel=0), (
                split,
                name,
            )
    read = [OFFICIAL.read_response(r) for r in responses]
    assert per_sample == [float(a == t) for a, t in zip(read, labels, strict=True)]


def test_the_generated_responses_cover_both_readings_and_the_edge_cases():
    responses, _ = pope_set(1000, 0.5, seed=0)
    read = [OFFICIAL.read_response(r) for r in responses]
    assert 0.1 < read.count("no") / len(read) < 0.9
    assert "" in responses and sum("No, there is not." in r for r in responses) > 10
    assert {e for e in EDGES if e in responses} == set(EDGES)


def test_where_the_official_script_divides_by_zero_mmlm_reports_zero():
    # all labels "no": recall is 0/0, the script stops; mmlm reports 0.0 for recall and F1 (docs/parity.md)
    responses, labels = ["No.", "Yes, there is.", "no"], ["no", "no", "no"]
    with pytest.raises(ZeroDivisionError):
        OFFICIAL.evaluate(responses, labels)
    samples = [Sample(str(i), "q", label=t) for i, t in enumerate(labels)]
    summary, _ = METRICS["pope"](responses, samples)
    assert (summary["recall"], summary["f1"], summary["precision"]) == (0.0, 0.0, 0.0)
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["yes_ratio"] == pytest.approx(1 / 3)
