"""VQA v2 answer normalisation and accuracy: worked examples of the official evaluation's rules and quirks."""

import pytest

from mmlm.errors import InputError
from mmlm.eval.vqa import exact_match, normalize_answer, process_punctuation, vqa_accuracy, vqa_scores


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number words become digits
        ("none", "0"),  # "none" counts as zero
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # the table stops at ten
        ("A dog", "dog"),  # articles go
        ("the red one", "red 1"),  # articles go, then "one" -> "1" (the map runs before the article check)
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("Isnt it", "isn't it"),
        ("Im", "im"),  # the table's capitalised keys are never reached: words are lower-cased first
        ("somebody'd", "somebodyd"),  # a table entry that runs backwards, kept as in the official code
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("1.", "1"),  # "(?!<=\d)" is a lookahead: a period after a digit goes too
        (".5", ".5"),
        ("1,000", "1000"),  # a comma between digits: every punctuation mark is deleted, not spaced
        ("1,000 (approx)", "1000 approx"),
        ("red,blue", "red blue"),  # no space beside the comma: it becomes a space
        ("red, blue", "red blue"),  # a space beside it: deleted, and the split joins the words again
        ("t-shirt", "t shirt"),
        ("t-shirt - red", "tshirt red"),  # " -" somewhere: every "-" is deleted, so "t-shirt" closes up
        ("what?!", "what"),  # "?" and "!" with no space beside them become spaces, then split away
        ("  Yes\tsir\n", "yes sir"),
        ("don't", "don't"),  # apostrophes are not punctuation
        ("50%", "50%"),  # neither is % (nor : # $ & * ' ^ | ~)
        ("a:b", "a:b"),
        ("", ""),
    ],
)
def test_normalize_answer_follows_the_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_period_strip_stops_after_32_as_the_official_code_does():
    # The official code passes re.UNICODE (32) where re.sub takes `count`.
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("a." * 10) == "a" * 10


@pytest.mark.parametrize(
    ("agreeing", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_accuracy_is_the_mean_over_leave_one_out_subsets(agreeing, accuracy):
    # k humans agree: those k see k-1 others agree, the other 10-k see k; each subset scores min(1, n/3)
    answers = ["2"] * agreeing + ["3"] * (10 - agreeing)
    assert vqa_accuracy("2", answers) == pytest.approx(accuracy)


def test_the_prediction_is_normalised_the_answers_only_lose_punctuation():
    # The official evaluate(): processPunctuation + processDigitArticle on the prediction, processPunctuation
    # alone on the human answers (when they differ), so "two" and "the cat" written by humans never match.
    answers = ["two"] * 3 + ["2"] * 4 + ["three"] * 3  # the prediction "2" meets the four "2" only
    assert vqa_accuracy("Two.", answers) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["two"] * 3 + ["2"] * 2 + ["three"] * 5) == pytest.approx(0.6)
    assert vqa_accuracy("a cat", ["cat", "cats", "kitten", "the cat"] + ["dog"] * 6) == pytest.approx(0.3)
    assert vqa_accuracy("cat", ["cat.", "cat."] + ["dog"] * 8) == pytest.approx(0.6)  # periods do go
    assert vqa_accuracy("cat", ["cat!", "cat!"] + ["dog"] * 8) == 0.0  # "!" becomes a space: "cat "


def test_unanimous_answers_compare_as_written_unless_always_normalize():
    # Unanimous answers are compared as written; the prediction is normalised in every case.
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("  2\n", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa_accuracy("2", ["Two"] * 10, always_normalize=True) == 1.0  # lmms-eval's vqav2 rule


def test_single_reference_gives_zero_vqa_accuracy_but_exact_match_works():
    assert vqa_accuracy("red", ["red"]) == 0.0  # nobody else agrees: use exact_match for one-answer data
    assert exact_match("Red.", "red")
    assert exact_match("The 2", "two")
    assert not exact_match("yes", "no")


def test_vqa_scores_per_type():
    scores = vqa_scores(["red", "3", "no", "yes"], [["red"], ["three"], ["yes"], ["yes"]],
                        ["color", "count", "presence", "presence"])  # fmt: skip
    assert scores == {
        "accuracy": 0.75,
        "accuracy_color": 1.0,
        "accuracy_count": 1.0,
        "accuracy_presence": 0.5,
    }
    ten = vqa_scores(["2"], [["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]])
    assert ten == {"accuracy": pytest.approx(0.6)}


@pytest.mark.parametrize(
    "call",
    [
        lambda: vqa_accuracy("a", []),
        lambda: vqa_accuracy("a", "abc"),
        lambda: vqa_scores(["a"], [["a"], ["b"]]),
        lambda: vqa_scores([], []),
    ],
)
def test_bad_input_raises_input_error(call):
    with pytest.raises(InputError):
        call()
