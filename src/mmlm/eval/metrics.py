"""VLM metrics: pure functions of parsed predictions and `Sample`s, each as its official code computes it.

Every metric is `metric(predictions, samples) -> (summary, per_sample_scores)`. The summary holds the overall
figures, "<figure>_<type>" for each question type present (mean of that type's samples; for POPE the five
figures recomputed on the subset, also per "pope_split" in `sample.meta`), and "primary", the name of the
headline figure. `METRICS` names them; `METRIC_PARSERS` gives each one's usual parser (`mmlm.eval.parsers`)
and `METRIC_REFERENCES` the `Sample` field that holds its references.

  vqa_accuracy      VQA v2 (Antol et al. 2015): min(1, #humans agreeing / 3) over 10 leave-one-out subsets;
                    one reference: exact match after VQA normalisation (as `mmlm.eval.vqa.vqa_scores`).
  exact_match       VQA-normalised equality with any reference answer.
  anls              DocVQA / InfographicVQA (Biten et al. 2019, eq. 1), as the `anls` package (`anls_score`).
  relaxed_accuracy  ChartQA (Masry et al. 2022), Pix2Struct's relaxed_correctness (`relaxed_correctness`).
  pope              POPE (Li et al. 2023) evaluate.py: accuracy, precision, recall, F1, yes_ratio.
  multiple_choice   accuracy of the chosen letter against `sample.label`.
  mmmu              MMMU's eval_utils.py: multiple choice by its letter parser, open questions by eval_open.
  caption           BLEU-1..4 and CIDEr-D (pycocoevalcap), CHAIR_i / CHAIR_s where meta has "objects".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mmlm.errors import InputError
from mmlm.eval.captioning import caption_metric
from mmlm.eval.mmmu import open_answer_correct
from mmlm.eval.parsers import mmmu_option, option_letter, yes_no
from mmlm.eval.vqa import exact_match as vqa_exact_match
from mmlm.eval.vqa import vqa_accuracy as vqa_leave_one_out

if TYPE_CHECKING:
    from mmlm.eval.tasks import Sample

Summary = dict[str, float | str]
Metric = Callable[[list[str], list["Sample"]], tuple[Summary, list[float]]]


def _check(predictions: Sequence[str], samples: Sequence[Sample]) -> None:
    if len(predictions) != len(samples):
        raise InputError(f"expected one prediction per sample, got {len(predictions)} for {len(samples)}")
    if not samples:
        raise InputError("expected at least one sample to score")


def _answers(sample: Sample) -> list[str]:
    answers = sample.answers
    if isinstance(answers, str) or not answers:
        raise InputError(
            f"sample {sample.id}: expected a non-empty list of reference answers, got {answers!r}"
        )
    return list(answers)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_by_type(name: str, scores: Sequence[float], samples: Sequence[Sample]) -> Summary:
    """Return {name: mean score, "<name>_<type>": mean over that type's samples, "primary": name}."""
    out: Summary = {name: _mean(scores)}
    types = sorted({str(s.type) for s in samples if s.type})
    for t in types:
        out[f"{name}_{t}"] = _mean([x for x, s in zip(scores, samples, strict=True) if str(s.type) == t])
    out["primary"] = name
    return out


# ---- short answers ----


def vqa_accuracy_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return VQA v2 accuracy (exact match for one-reference questions), overall and per type."""
    _check(predictions, samples)
    scores = []
    for p, s in zip(predictions, samples, strict=True):
        refs = _answers(s)
        scores.append(float(vqa_exact_match(p, refs[0])) if len(refs) == 1 else vqa_leave_one_out(p, refs))
    return mean_by_type("vqa_accuracy", scores, samples), scores


def any_reference(
    name: str, correct: Callable[[str, str], bool], predictions: list[str], samples: list[Sample]
) -> tuple[Summary, list[float]]:
    """Return metric `name`: a prediction scores 1 when `correct(prediction, reference)` holds for any reference."""
    _check(predictions, samples)
    scores = [
        float(any(correct(p, a) for a in _answers(s))) for p, s in zip(predictions, samples, strict=True)
    ]
    return mean_by_type(name, scores, samples), scores


def exact_match_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return the share of predictions equal to some reference after VQA normalisation of both."""
    return any_reference("exact_match", vqa_exact_match, predictions, samples)


def levenshtein(a: str, b: str) -> int:
    """Return the edit distance (insertions, deletions, substitutions, each 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


ANLS_THRESHOLD = 0.5  # τ of Biten et al. 2019, eq. 1


def anls_score(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Return one question's ANLS: max over answers of 1 − NL(answer, prediction), 0 where NL ≥ threshold.

    Biten et al. 2019, eq. 1, as the `anls` package (the test's reference) computes it: both strings are
    lower-cased, stripped and their inner whitespace collapsed, and NL = edit distance / the longer cleaned
    string's length. The RRC evaluation script (and lmms-eval's copy) differs in two corners, see
    docs/parity.md: it divides by the raw strings' lengths and keeps 0.5 at exactly NL = τ.
    """
    clean_prediction = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        clean_answer = " ".join(answer.strip().lower().split())
        # the reference measures the upper-cased strings ("ß" counts 2, as "SS"); we keep its lengths exactly
        length = max(len(clean_answer.upper()), len(clean_prediction.upper()))
        distance = 0.0 if length == 0 else levenshtein(clean_answer, clean_prediction) / length
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def anls_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return ANLS (mean over questions of `anls_score`), overall and per type."""
    _check(predictions, samples)
    scores = [anls_score(p, _answers(s)) for p, s in zip(predictions, samples, strict=True)]
    return mean_by_type("anls", scores, samples), scores


RELAXED_TOLERANCE = 0.05  # ChartQA: "within 5% of the gold answer" (Methani et al. 2020)


def _to_float(text: str) -> float | None:
    # Pix2Struct's _to_float: a trailing "%" divides by 100; anything float() refuses, "1,000" included, is text
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """Return True if both are numbers within `tolerance` relative error, or equal lower-cased strings.

    Pix2Struct's relaxed_correctness (google-research/pix2struct metrics.py, as lmms-eval's ChartQA task):
    |p − t| / |t| ≤ 0.05 when both parse as floats and t ≠ 0; otherwise case-insensitive string equality, so
    a target of 0 needs the same text ("0" ≠ "0.0"). "%" makes a fraction ("50%" = "0.5", but "50%" ≠ "50");
    thousands separators are not removed ("1,000" is compared as text), exactly as that code does.
    Deliberate deviation: both strings are stripped first (the official code relies on float() doing so).
    """
    prediction, target = prediction.strip(), target.strip()
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return ChartQA relaxed accuracy (correct against any reference, as Pix2Struct's aggregate), per type."""
    return any_reference("relaxed_accuracy", relaxed_correctness, predictions, samples)


# ---- yes/no and multiple choice ----


def _pope_label(sample: Sample) -> str:
    label = str(sample.label or "").strip().lower()
    if label not in ("yes", "no"):
        raise InputError(f"sample {sample.id}: POPE needs label 'yes' or 'no', got {sample.label!r}")
    return label


def pope_figures(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Return POPE's accuracy, precision, recall, F1 and yes_ratio, "yes" being the positive class.

    As POPE's evaluate.py; where it would divide by zero (no "yes" predicted, or no "yes" label) the
    figure is 0.0, as is F1 when precision + recall = 0.
    """
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels, strict=True))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels, strict=True))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predictions) / len(predictions),  # share of *predictions*
    }


def pope_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return POPE's five figures overall, per pope_split (meta) and per type; per sample 1.0 if correct.

    Predictions go through POPE's yes/no rule again (`parsers.yes_no`, idempotent), as evaluate.py does.
    """
    _check(predictions, samples)
    answers = [yes_no(p) for p in predictions]
    labels = [_pope_label(s) for s in samples]
    out: Summary = dict(pope_figures(answers, labels))
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        for group in {str(g) for g in (s.meta.get("pope_split"), s.type) if g}:  # often the same name
            groups.setdefault(group, []).append(i)
    for group in sorted(groups):
        rows = groups[group]
        figures = pope_figures([answers[i] for i in rows], [labels[i] for i in rows])
        out.update({f"{name}_{group}": value for name, value in figures.items()})
    out["primary"] = "accuracy"
    return out, [float(a == t) for a, t in zip(answers, labels, strict=True)]


def multiple_choice_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return the accuracy of the chosen letter against `sample.label`, overall and per type.

    Predictions go through `parsers.option_letter` again (idempotent), so raw responses score the same.
    """
    _check(predictions, samples)
    scores = []
    for p, s in zip(predictions, samples, strict=True):
        label = str(s.label or "").strip().upper()
        if len(label) != 1 or not label.isalpha():
            raise InputError(f"sample {s.id}: multiple choice needs a letter label, got {s.label!r}")
        scores.append(float(option_letter(p, s) == label))
    return mean_by_type("accuracy", scores, samples), scores


def mmmu_metric(predictions: list[str], samples: list[Sample]) -> tuple[Summary, list[float]]:
    """Return MMMU accuracy over raw responses, overall and per type: a sample with `choices` scores the letter
    MMMU's parser picks against its `label`, an open one (no choices) MMMU's eval_open against its `answers`."""
    _check(predictions, samples)
    scores = []
    for response, sample in zip(predictions, samples, strict=True):
        if sample.choices:
            label = str(sample.label or "").strip().upper()
            if len(label) != 1 or not label.isalpha():
                raise InputError(f"sample {sample.id}: an MMMU multiple-choice sample needs a letter label")
            scores.append(float(mmmu_option(response, sample) == label))
        elif not sample.answers:
            raise InputError(f"sample {sample.id}: an MMMU open question (no choices) needs its answers")
        else:
            scores.append(float(open_answer_correct(response, sample.answers)))
    return mean_by_type("accuracy", scores, samples), scores


METRICS: dict[str, Metric] = {
    "vqa_accuracy": vqa_accuracy_metric,
    "exact_match": exact_match_metric,
    "anls": anls_metric,
    "relaxed_accuracy": relaxed_accuracy_metric,
    "pope": pope_metric,
    "multiple_choice": multiple_choice_metric,
    "mmmu": mmmu_metric,
    "caption": caption_metric,
}
# the parser each metric usually follows (a task may name another)
METRIC_PARSERS: dict[str, str] = {
    "vqa_accuracy": "vqa",
    "exact_match": "vqa",
    "anls": "raw",  # the official scripts score the whole response; ANLS cleans it itself
    "relaxed_accuracy": "raw",  # Pix2Struct's relaxed_correctness reads the whole response
    "pope": "yes_no",
    "multiple_choice": "option_letter",
    "mmmu": "raw",  # the metric applies MMMU's own parsers, one per question kind
    "caption": "caption",
}
# the Sample field each metric reads its references from
METRIC_REFERENCES: dict[str, str] = {
    "vqa_accuracy": "answers",
    "exact_match": "answers",
    "anls": "answers",
    "relaxed_accuracy": "answers",
    "pope": "label",
    "multiple_choice": "label",
    "mmmu": "label",  # and `answers` for open questions
    "caption": "answers",
}
