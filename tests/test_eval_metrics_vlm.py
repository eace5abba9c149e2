"""VLM metrics and answer parsers: worked examples of each official rule, parity with pycocoevalcap's scorers,
and `mmlm score` on a predictions file with its bad-input errors."""

import json
import re

import pytest

from mmlm.cli import main
from mmlm.data.synthetic.scene import COLORS, SHAPES
from mmlm.errors import InputError
from mmlm.eval import captioning
from mmlm.eval.captioning import caption_scores, ptb_tokenize, python_tokenize
from mmlm.eval.chair import CHAIR_SYNONYMS, chair_scores, object_mentions
from mmlm.eval.metrics import (
    METRIC_PARSERS,
    METRICS,
    anls_score,
    pope_figures,
    relaxed_correctness,
)
from mmlm.eval.parsers import PARSERS
from mmlm.eval.tasks import Sample
from mmlm.eval.vqa import normalize_answer
from system_programs import needs_program

needs_java = needs_program("java", "default-jre-headless")  # pycocoevalcap's PTBTokenizer runs it


# ---- VQA v2 normalisation ----
# Expected values read off the official vqaEval.py (Antol et al. 2015, github.com/GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py): processPunctuation deletes each mark of `punct` when the
# answer has it beside a space or has a comma between digits, else turns it into a space; periodStrip
# "(?!<=\d)(\.)(?!\d)" deletes every period not followed by a digit; processDigitArticle lower-cases, maps
# manualMap (none, zero..ten), drops the articles a/an/the and applies the contractions table. These add to the
# 27 cases of tests/test_vqa_metric.py (none repeated) for 75 in all.
VQA_NORMALISATION = [
    ("Three", "3"),  # manualMap after lower-casing
    ("NONE", "0"),
    ("zero", "0"),
    ("seven cats", "7 cats"),
    ("twelve", "twelve"),  # manualMap stops at ten
    ("ten.", "10"),  # period deleted, then mapped
    ("  two  ", "2"),
    ("Two Dogs.", "2 dogs"),
    ("one-way", "1 way"),  # "-" becomes a space, so "one" is a word of its own and maps to 1
    ("one, two", "1 2"),  # ", " present: commas deleted
    ("two and a half", "2 and half"),  # the article goes from the middle too
    ("The", ""),  # an answer that is only an article normalises to nothing
    ("the the", ""),
    ("A", ""),
    ("an", ""),
    ("An Orange", "orange"),
    ("Theater", "theater"),  # only whole words are articles
    ("Yes.", "yes"),
    ("No!", "no"),  # "!" not beside a space: becomes a space, then the split drops it
    ("no.", "no"),
    ("yes sir!", "yes sir"),
    ("...yes", "yes"),
    ("2.", "2"),  # the period after a digit goes: (?!<=\d) is a lookahead
    ("2.5", "2.5"),
    ("1.5.", "1.5"),  # the decimal point stays, the final period goes
    ("3 .5", "3 .5"),  # a period before a digit stays
    ("10 .", "10"),
    ("a.m.", "am"),
    ("U.S.A", "usa"),
    ("$2.50", "$2.50"),  # $ is not in the punctuation list
    ("10:30", "10:30"),  # nor is :
    ("#1", "#1"),  # nor is #
    ("3,5", "35"),  # a comma between digits: every mark is deleted
    ("1,000,000", "1000000"),
    ("1/2", "1 2"),  # "/" is punctuation: a fraction splits into two numbers, as the official code does
    ("(3)", "3"),
    ("up/down", "up down"),
    ("left-hand side", "left hand side"),
    ("fire-hydrant, red", "fire hydrant red"),  # ", " deletes commas; "-" has no space beside it: a space
    ("red, white, and blue", "red white and blue"),
    ("red,white", "red white"),
    ('say "hi"', "say hi"),  # ' "' present: quotes deleted
    ("well;", "well"),
    ("x<y", "x y"),
    ("e=mc2", "e mc2"),
    ("a_b", "b"),  # "_" becomes a space, then "a" is an article
    ("@home", "home"),
    ("hello world!", "hello world"),
    ("isnt", "isn't"),  # contractions table
    ("whats", "what's"),
    ("cant", "can't"),
    ("wont", "won't"),
    ("youre", "you're"),
    ("Dont know", "don't know"),
    ("oclock", "o'clock"),
    ("5 oclock", "5 o'clock"),
    ("doesn't", "doesn't"),  # already written with the apostrophe
    ("i'm", "i'm"),
    ("ive", "ive"),  # the table's key is "Ive", never reached after lower-casing
    ("it's 5:00", "it's 5:00"),
    ("tennis racket's", "tennis racket's"),
]


def test_vqa_normalisation_cases_are_distinct_and_at_least_40():
    assert len({raw for raw, _ in VQA_NORMALISATION}) == len(VQA_NORMALISATION) >= 40


@pytest.mark.parametrize(("raw", "normalised"), VQA_NORMALISATION)
def test_vqa_normalisation_follows_the_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_metric_per_type_and_single_reference():
    samples = [
        Sample("1", "how many?", answers=["2"] * 2 + ["3"] * 8, type="count"),  # 2 humans agree with "2"
        Sample("2", "colour?", answers=["red"], type="color"),  # one reference: exact match after normalising
        Sample("3", "colour?", answers=["blue"], type="color"),
    ]
    summary, scores = METRICS["vqa_accuracy"](["two", "Red.", "green"], samples)
    assert scores == pytest.approx([0.6, 1.0, 0.0])
    assert summary["vqa_accuracy"] == pytest.approx(1.6 / 3)
    assert summary["vqa_accuracy_count"] == pytest.approx(0.6)
    assert summary["vqa_accuracy_color"] == pytest.approx(0.5)
    assert summary["primary"] == "vqa_accuracy"


def test_exact_match_takes_any_reference():
    samples = [Sample("1", "q", answers=["2", "two dogs"]), Sample("2", "q", answers=["cat"])]
    summary, scores = METRICS["exact_match"](["Two dogs", "a dog"], samples)
    assert scores == [1.0, 0.0] and summary["exact_match"] == 0.5


# ---- ANLS (DocVQA) ----


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Hello", ["hello"], 1.0),  # lower-cased
        ("  The  Cat ", ["the cat"], 1.0),  # stripped, inner whitespace collapsed
        ("abcdefghiX", ["abcdefghij"], 0.9),  # one edit in ten characters
        ("1995", ["1996", "nineteen ninety-five"], 0.75),  # the best answer counts
        ("ab", ["ax"], 0.0),  # NL = 0.5 exactly: paper eq. 1 and the anls package give 0 (the RRC script 0.5)
        ("abcd", ["abxy"], 0.0),
        ("abcdefgh", ["abcdexyz"], 0.625),  # NL = 3/8, under τ: 1 − NL kept
        ("abc", ["axy"], 0.0),  # NL = 2/3 > 0.5
        ("abcdefghij", ["abcdefXXXX"], 0.6),  # NL = 0.4
        ("abcdefghijk", ["abcdefXXXXX"], 1 - 5 / 11),  # NL = 0.4545, just under τ: 1 − NL kept
        ("abcdefghi", ["abcdXXXXX"], 0.0),  # NL = 5/9 = 0.556, just over τ
        ("a  b", ["ab"], 1 - 1 / 3),  # divided by the cleaned length ("a b", 3); the RRC script uses 4
        ("", [""], 1.0),  # both empty: distance 0
        ("anything", ["ab", "anything"], 1.0),
    ],
)
def test_anls_score(prediction, answers, expected):
    assert anls_score(prediction, answers) == pytest.approx(expected)


def test_anls_threshold_edge_and_mean():
    # one edit in two characters sits exactly on τ = 0.5 and scores 0 (eq. 1: NL ≥ τ); one in three is kept
    assert anls_score("ab", ["ax"]) == 0.0
    assert anls_score("abc", ["abx"]) == pytest.approx(2 / 3)
    samples = [Sample(str(i), "q", answers=a) for i, a in enumerate([["invoice"], ["abc"], ["2019"]])]
    summary, scores = METRICS["anls"](["Invoice", "abx", "1066"], samples)
    assert scores == pytest.approx([1.0, 2 / 3, 0.0])
    assert summary["anls"] == pytest.approx(5 / 9)


# ---- relaxed accuracy (ChartQA) ----


@pytest.mark.parametrize(
    ("prediction", "target", "correct"),
    [
        ("104.9", "100", True),  # 4.9 % off
        ("105.1", "100", False),  # 5.1 % off
        ("95.1", "100", True),
        ("94.9", "100", False),
        ("105", "100", True),  # exactly 5 %: |p − t| / |t| ≤ 0.05
        ("-10.4", "-10", True),  # relative to |t|
        ("50%", "0.5", True),  # "%" divides by 100
        ("52%", "50%", True),  # 0.52 vs 0.5: 4 %
        ("50%", "50", False),  # 0.5 vs 50
        ("0", "0", True),  # t = 0: compared as text
        ("0.0", "0", False),
        ("0.01", "0", False),
        ("1,000", "1000", False),  # thousands separators are not removed: compared as text
        ("1,000", "1,000", True),
        ("Yes", "yes", True),  # text: case-insensitive equality
        (" Blue ", "blue", True),  # stripped (our one deviation)
        ("blue", "red", False),
        ("12", "twelve", False),
    ],
)
def test_relaxed_correctness(prediction, target, correct):
    assert relaxed_correctness(prediction, target) is correct


def test_relaxed_accuracy_metric_any_reference():
    samples = [Sample("1", "q", answers=["20", "twenty"], type="human"), Sample("2", "q", answers=["7"])]
    summary, scores = METRICS["relaxed_accuracy"](["twenty", "8"], samples)
    assert scores == [1.0, 0.0]
    assert summary == {"relaxed_accuracy": 0.5, "relaxed_accuracy_human": 1.0, "primary": "relaxed_accuracy"}


# ---- POPE ----


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        ("Yes, there is a cat.", "yes"),
        ("No, there is not.", "no"),
        ("There is no cat in the image.", "no"),
        ("I do not see one", "no"),
        ("Yes. There is no dog.", "yes"),  # only the text before the first "." counts
        ("no, there isn't", "no"),  # commas are removed before the split
        ("No\nThere is none", "yes"),  # official quirk: only spaces split words, "No\nThere" is one word
        ("NO", "yes"),  # only "No", "not" and "no" count
        ("no!", "yes"),
        ("", "yes"),
    ],
)
def test_yes_no_parser_is_popes_rule(response, parsed):
    assert PARSERS["yes_no"](response, None) == parsed


def test_pope_yes_biased_model():
    labels = ["yes", "no", "yes", "no", "no", "yes", "no", "no"]  # 3 of 8 positive
    samples = [Sample(str(i), "Is there a red circle?", label=t) for i, t in enumerate(labels)]
    summary, scores = METRICS["pope"](["Yes, there is."] * 8, samples)
    assert summary["recall"] == 1.0
    assert summary["precision"] == pytest.approx(3 / 8)  # the positive rate
    assert summary["yes_ratio"] == 1.0
    assert summary["accuracy"] == pytest.approx(3 / 8)
    assert summary["f1"] == pytest.approx(2 * (3 / 8) / (1 + 3 / 8))
    assert scores == [float(t == "yes") for t in labels]


def test_pope_per_split_and_degenerate_cases():
    samples = [
        Sample("r1", "q", label="yes", type="random", meta={"pope_split": "random"}),
        Sample("r2", "q", label="no", type="random", meta={"pope_split": "random"}),
        Sample("a1", "q", label="yes", type="adversarial", meta={"pope_split": "adversarial"}),
        Sample("a2", "q", label="no", type="adversarial", meta={"pope_split": "adversarial"}),
    ]
    summary, _ = METRICS["pope"](["yes", "no", "yes", "yes"], samples)
    assert summary["accuracy_random"] == 1.0 and summary["accuracy_adversarial"] == 0.5
    assert summary["yes_ratio"] == 0.75 and summary["precision_adversarial"] == 0.5
    # nothing predicted "yes": precision and F1 would divide by zero in evaluate.py; we give 0
    assert pope_figures(["no", "no"], ["yes", "no"]) == {
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
    }  # fmt: skip
    with pytest.raises(InputError, match="sample x"):
        METRICS["pope"](["yes"], [Sample("x", "q", label="maybe")])


# ---- multiple choice ----

MC_CHOICES = ["red circle", "blue square", "dark red star", "green heart"]
MC_SAMPLE = Sample("mc", "Which shape?", choices=MC_CHOICES, label="C")


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("C", "C"),
        ("c", "C"),  # a bare letter in any case
        ("(C)", "C"),
        ("C.", "C"),
        ("[C]", "C"),
        ("Answer: C", "C"),
        ("**Answer:** C", "C"),
        ("The answer is C.", "C"),
        ("The answer is (C)", "C"),
        ("the answer is option C", "C"),
        ("Between A and B, I pick C", "C"),  # the last standalone letter
        ("I think it is C", "C"),  # "I" before a lower-case word is the pronoun, not option I
        ("C. dark red star", "C"),  # a leading label
        ("(B) blue square", "B"),
        ("A red circle.", "A"),  # "A" is an article here; the option text matches
        ("It is a dark red star.", "C"),  # option text, longest match: not the "red" inside it
        ("I would say the blue square", "B"),
        ("The answer is a cat", ""),  # a lower-case "a" states no letter; no option text either
        ("E", ""),  # only four options
        ("no idea", ""),
    ],
)
def test_option_letter_parser(response, letter):
    assert PARSERS["option_letter"](response, MC_SAMPLE) == letter


def test_multiple_choice_metric_parses_again_and_checks_labels():
    samples = [MC_SAMPLE, Sample("2", "q", choices=["x", "y"], label="b", type="color")]
    summary, scores = METRICS["multiple_choice"](["The answer is (C).", "A"], samples)
    assert scores == [1.0, 0.0] and summary["accuracy"] == 0.5 and summary["accuracy_color"] == 0.0
    with pytest.raises(InputError, match="letter label"):
        METRICS["multiple_choice"](["A"], [Sample("3", "q", label="red")])


@pytest.mark.parametrize(
    ("response", "number"),
    [
        ("There are three circles.", "3"),
        ("3", "3"),
        ("1,250 people", "1250"),
        ("-3.5 degrees", "-3.5"),
        ("45%", "45"),
        ("from 2015-2016", "2015"),
        ("about .5", ".5"),
        ("none", ""),
    ],
)
def test_number_parser(response, number):
    assert PARSERS["number"](response, None) == number


def test_vqa_and_caption_parsers_and_idempotence():
    assert PARSERS["vqa"]("  red\nbecause it is red ", None) == "red"
    assert PARSERS["caption"]("  a red circle.\n", None) == "a red circle."
    for name, text in [("vqa", "two dogs"), ("yes_no", "no"), ("option_letter", "B"), ("number", "-2.5")]:
        once = PARSERS[name](text, MC_SAMPLE)
        assert PARSERS[name](once, MC_SAMPLE) == once
    assert set(METRIC_PARSERS) == set(METRICS) and set(METRIC_PARSERS.values()) <= set(PARSERS)


# ---- CHAIR ----


def test_chair_vocabulary_covers_the_shapes_world():
    assert set(COLORS) | set(SHAPES) == set(CHAIR_SYNONYMS)


@pytest.mark.parametrize(
    ("caption", "mentions"),
    [
        ("a red circle and a blue square", ["red circle", "blue square"]),
        ("A crimson disc beside a navy box.", ["red circle", "blue square"]),  # synonyms
        ("two red circles and three blue crosses", ["red circle", "blue cross"]),  # plurals, -es too
        ("two small red circles", ["red circle"]),  # size words between colour and shape
        ("a large shape: a plus sign", ["cross"]),  # two-word synonym, no colour before it
        ("a green star, another green star", ["green star", "green star"]),  # repeats kept
        ("the circle is red", ["circle"]),  # the colour must come before the shape
        ('the word "cat" written in blue', []),
    ],
)
def test_object_mentions(caption, mentions):
    assert object_mentions(caption) == mentions


def test_chair_counts_every_mention_and_each_caption_once():
    truth = ["red circle", "blue square"]
    captions = [
        "a red circle and a blue square",  # 2 mentions, none hallucinated
        "a crimson disc and two navy boxes",  # synonyms and plurals: 2, none
        "a green star, a green star again and a red circle",  # repeated hallucination: 3 mentions, 2 wrong
        "a blue circle",  # wrong colour for the circle: 1, 1 wrong
        "a circle and a heart",  # colourless: the circle is there, the heart is not: 2, 1 wrong
    ]
    scores = chair_scores(captions, [truth] * len(captions))
    assert scores["chair_i"] == pytest.approx((0 + 0 + 2 + 1 + 1) / (2 + 2 + 3 + 1 + 2))
    assert scores["chair_s"] == pytest.approx(3 / 5)
    # a colourless ground truth grounds any colour of that shape
    assert chair_scores(["a purple circle"], [["circle"]]) == {"chair_i": 0.0, "chair_s": 0.0}
    assert chair_scores(["nothing to see"], [truth]) == {"chair_i": 0.0, "chair_s": 0.0}  # no mention
    with pytest.raises(InputError, match="'dog'"):
        chair_scores(["a dog"], [["dog"]])


# ---- BLEU / CIDEr-D ----

CAPTION_REFS = [
    ["a red circle at the top left.", "A red circle.", "one red circle in the corner"],
    ["two blue squares and a green star", "a green star and two blue squares", "Blue squares, green star."],
    ['the word "cat" written in white', 'a sign that says "cat"', "white text: cat"],
    ["a small yellow heart on the right", "a yellow heart", "a photo of a yellow heart"],
]
CAPTION_PREDICTIONS = [
    "a red circle.",
    "two blue squares and a star",
    "the word cat in white",
    "a purple heart",
]


def _reference_scores(tokenize):
    """BLEU and CIDEr-D from pycocoevalcap's scorers called directly on tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts, res = tokenize(CAPTION_REFS, CAPTION_PREDICTIONS)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return bleu, cider


def _official_ptb(refs, predictions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({str(i): [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tokenizer.tokenize({str(i): [{"caption": p}] for i, p in enumerate(predictions)})
    return gts, res


@needs_java
def test_bleu_and_cider_match_pycocoevalcap_with_the_ptb_tokenizer():
    bleu, cider = _reference_scores(_official_ptb)
    summary, per_caption = caption_scores(CAPTION_PREDICTIONS, CAPTION_REFS, tokenizer="ptb-java")
    assert summary["tokenizer"] == "ptb-java"
    assert [summary[f"bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert summary["cider"] == pytest.approx(cider, abs=1e-12)
    assert sum(per_caption) / len(per_caption) == pytest.approx(cider)
    assert 0 < summary["bleu_4"] < summary["bleu_1"] < 1 and summary["cider"] > 0


@needs_java
def test_python_fallback_tokenizer_agrees_on_plain_captions_and_where_it_differs():
    plain = [c for refs in CAPTION_REFS for c in refs] + CAPTION_PREDICTIONS
    plain += ["A man's dog (small) runs.", "It isn't \"big\"; it's 3.5 m -- ok...", "can't stop, U.S. flag!"]
    assert python_tokenize(plain) == ptb_tokenize(plain)
    java, fallback = (
        caption_scores(CAPTION_PREDICTIONS, CAPTION_REFS, "ptb-java")[0],
        caption_scores(CAPTION_PREDICTIONS, CAPTION_REFS, "python-fallback")[0],
    )
    assert fallback["tokenizer"] == "python-fallback"
    assert {k: v for k, v in fallback.items() if k != "tokenizer"} == pytest.approx(
        {k: v for k, v in java.items() if k != "tokenizer"}, abs=1e-12
    )
    # the documented differences: PTB's abbreviation list, apostrophes inside words, <angle> tokens
    assert ptb_tokenize(["Mr. Smith at 5 o'clock <b>"]) == ["mr. smith at 5 o'clock <b>"]
    assert python_tokenize(["Mr. Smith at 5 o'clock <b>"]) == ["mr smith at 5 o clock < b >"]
    # and where they differ, so do the scores: "o clock" is two unigrams, one more of them matching
    odd = (["a clock at 5 o'clock"], [["the clock says 5 o'clock"]])
    assert caption_scores(*odd, "ptb-java")[0]["bleu_1"] == pytest.approx(3 / 5)
    assert caption_scores(*odd, "python-fallback")[0]["bleu_1"] == pytest.approx(4 / 6)


def test_caption_metric_without_java_uses_the_fallback_and_adds_chair(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    samples = [
        Sample(str(i), "Describe the image.", answers=refs, type="objects" if i != 2 else "text",
               meta={"objects": objects})
        for i, (refs, objects) in enumerate(zip(CAPTION_REFS, [["red circle"], ["blue square", "green star"],
                                                               [], ["yellow heart"]], strict=True))
    ]  # fmt: skip
    summary, per_caption = METRICS["caption"](CAPTION_PREDICTIONS, samples)
    assert summary["tokenizer"] == "python-fallback"
    assert summary["primary"] == "cider" and len(per_caption) == 4
    assert summary["chair_i"] == pytest.approx(1 / 4)  # red circle, blue square, star; purple heart is wrong
    assert summary["chair_s"] == pytest.approx(1 / 4)
    assert summary["cider_text"] == pytest.approx(per_caption[2])
    # a perfect caption set: BLEU 1 (pycocoevalcap's smoothing leaves it a hair under) and CIDEr-D's maximum, 10
    perfect = [["a small red circle at the top"], ["two blue squares on the left"]]
    identical, _ = caption_scores([r[0] for r in perfect], perfect, tokenizer="python-fallback")
    assert identical["bleu_4"] == pytest.approx(1.0) and identical["cider"] == pytest.approx(10.0)


# ---- mmlm score ----


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _score(capsys, *argv):
    status = main(["score", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


def test_score_cli_vqa_with_types(tmp_path, capsys):
    path = _write(tmp_path / "preds.jsonl", [
        {"question_id": 1, "prediction": "Two\nbecause I counted", "answers": ["2"] * 3 + ["3"] * 7, "type": "count"},
        {"id": "b", "prediction": "red", "answers": "red", "type": "color"},
        "",
    ])  # fmt: skip
    status, out, _ = _score(capsys, "vqa_accuracy", path, "--types")
    result = json.loads(out)
    assert status == 0 and result["parser"] == "vqa" and result["n"] == 2
    assert result["metrics"]["vqa_accuracy_count"] == pytest.approx(0.9)
    assert result["metrics"]["vqa_accuracy"] == pytest.approx(0.95)
    status, out, _ = _score(capsys, "vqa_accuracy", path)
    assert "vqa_accuracy_count" not in json.loads(out)["metrics"]  # per-type figures only with --types


def test_score_cli_builtin_task_and_parser_override(tmp_path, capsys):
    path = _write(tmp_path / "pope.jsonl", [
        {"id": "1", "prediction": "Yes, there is.", "label": "yes"},
        {"id": "2", "prediction": "There is no cat.", "label": "no"},
    ])  # fmt: skip
    status, out, _ = _score(capsys, "shapes-pope", path)
    result = json.loads(out)
    assert status == 0 and (result["metric"], result["parser"]) == ("pope", "yes_no")
    assert result["metrics"]["accuracy"] == 1.0
    counts = _write(tmp_path / "count.jsonl", [{"id": "1", "prediction": "I see three.", "answers": ["3"]}])
    status, out, _ = _score(capsys, "exact_match", counts, "--parser", "number")
    assert status == 0 and json.loads(out)["metrics"]["exact_match"] == 1.0


@pytest.mark.parametrize(
    ("metric", "rows", "message"),
    [
        (
            "vqa_accuracy",
            ['{"id": 1, "prediction": "a", "answers": ["a"]}', "{not json"],
            r"preds\.jsonl:2: invalid JSON",
        ),
        (
            "vqa_accuracy",
            [{"prediction": "a", "answers": ["a"]}],
            r'preds\.jsonl:1: expected "question_id" or "id"',
        ),
        ("vqa_accuracy", [{"id": 1, "answers": ["a"]}], r'preds\.jsonl:1: expected "prediction"'),
        ("vqa_accuracy", [{"id": 1, "prediction": "a"}], r'preds\.jsonl:1: vqa_accuracy needs "answers"'),
        ("anls", [{"id": 1, "prediction": "a", "answers": [1, 2]}], r'preds\.jsonl:1: "answers" must be'),
        ("pope", [{"id": 1, "prediction": "yes", "label": "maybe"}], r'preds\.jsonl:1: pope needs "label"'),
        (
            "multiple_choice",
            [{"id": 1, "prediction": "A", "choices": ["x", "y"], "label": "C"}],
            r"preds\.jsonl:1: multiple_choice",
        ),
        (
            "caption",
            [{"id": 1, "prediction": "a dog", "answers": ["a dog"], "objects": ["dog"]}],
            r"preds\.jsonl:1: .*'dog'",
        ),
        ("vqa_accuracy", ["[1, 2]"], r"preds\.jsonl:1: expected a JSON object"),
        ("vqa_accuracy", [], r"preds\.jsonl: no predictions"),
        ("bleu", [{"id": 1, "prediction": "a", "answers": ["a"]}], r"unknown metric 'bleu'"),
    ],
)
def test_score_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, metric, rows, message):
    path = _write(tmp_path / "preds.jsonl", rows)
    status, out, err = _score(capsys, metric, path)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("mmlm: error: ")
    assert re.search(message, err), err


def test_score_cli_missing_file_and_unknown_parser(tmp_path, capsys):
    status, _, err = _score(capsys, "anls", tmp_path / "absent.jsonl")
    assert status == 2 and "absent.jsonl: predictions file not found" in err
    path = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": "a", "answers": ["a"]}])
    status, _, err = _score(capsys, "anls", path, "--parser", "regex")
    assert status == 2 and "--parser" in err
