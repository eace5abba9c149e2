"""mmlm's ANLS against the `anls` package (Biten et al. 2019's definition) on generated DocVQA-style answers."""

import json
import random

import pytest
from anls import anls_score as reference_anls

from mmlm.cli import main
from mmlm.eval.metrics import METRICS, anls_score
from mmlm.eval.tasks import Sample

ALPHABET = "abcdefghij ABC0123456789 -.,/$%éßİﬁ中文\t\n"  # "ß", "İ" and "ﬁ" change length when case changes
WORDS = ["invoice", "Total", "1,250.00", "$ 42", "12/03/1998", "Dr. Smith", "ß", "İstanbul", "中文", "naïve"]


def _edit(text: str, rng: random.Random) -> str:
    """Return `text` after a few random insertions, deletions, substitutions, case and whitespace changes."""
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        kind, i = rng.randrange(6), rng.randint(0, len(chars))
        if kind == 0:
            chars.insert(i, rng.choice(ALPHABET))
        elif kind == 1 and i < len(chars):
            del chars[i]
        elif kind == 2 and i < len(chars):
            chars[i] = rng.choice(ALPHABET)
        elif kind == 3:
            chars = list("".join(chars).upper() if rng.random() < 0.5 else "".join(chars).title())
        elif kind == 4:
            chars.insert(i, rng.choice(["  ", "\t", " \n ", "\u3000"]))
    text = "".join(chars)
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", "  ", "\t"]) if rng.random() < 0.3 else text


def _answer(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return ""
    if rng.random() < 0.5:
        return " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12)))


def generated_questions(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Return n (prediction, answers) pairs: edits of one answer, unrelated text, empty strings."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        answers = [_answer(rng) for _ in range(rng.randint(1, 3))]
        roll = rng.random()
        prediction = "" if roll < 0.05 else _answer(rng) if roll < 0.2 else _edit(rng.choice(answers), rng)
        questions.append((prediction, answers))
    return questions


QUESTIONS = generated_questions(3000)


def test_anls_equals_the_anls_package_per_question_and_in_the_mean():
    ours = [anls_score(p, answers) for p, answers in QUESTIONS]
    theirs = [reference_anls(p, answers) for p, answers in QUESTIONS]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 1e-12
    # the set is not trivial: every regime of the metric occurs
    assert sum(s == 1.0 for s in ours) > 300 and sum(s == 0.0 for s in ours) > 300
    assert sum(0.5 <= s < 1.0 for s in ours) > 300
    samples = [Sample(str(i), "q", answers=answers) for i, (_, answers) in enumerate(QUESTIONS)]
    summary, _ = METRICS["anls"]([p for p, _ in QUESTIONS], samples)
    assert summary["anls"] == pytest.approx(sum(theirs) / len(theirs), abs=1e-12)


@pytest.mark.parametrize("name", ["anls", "docvqa", "infovqa"])
def test_score_command_gives_the_reference_anls_on_raw_predictions(tmp_path, capsys, name):
    # multi-line and padded predictions: the official script scores them whole, so no parser may cut them
    questions = QUESTIONS[:400] + [("Invoice\nnumber 42", ["invoice number 42"]), ("  ab  ", ["abc"])]
    path = tmp_path / "predictions.jsonl"
    rows = [{"question_id": i, "prediction": p, "answers": a} for i, (p, a) in enumerate(questions)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert main(["score", name, str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = sum(reference_anls(p, a) for p, a in questions) / len(questions)
    assert (result["metric"], result["parser"]) == ("anls", "raw")
    assert result["metrics"]["anls"] == pytest.approx(expected, abs=1e-12)
