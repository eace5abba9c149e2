"""mmlm's VQA v2 normalisation and accuracy against the official vqaEval.py, run, on generated answers.

The official file (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py) is not on PyPI; LAVIS
ships it unchanged as lavis/common/vqa_tools/vqa_eval.py, loaded here on its own. lmms-eval's
EvalAIAnswerProcessor (MMF's copy of the EvalAI processor) is compared too, where it differs from the official
rule only as docs/parity.md says.
"""

import random
import re
from types import SimpleNamespace

import pytest

from fixtures_answers import free_text, short_answer
from mmlm.eval.metrics import METRICS
from mmlm.eval.tasks import Sample
from mmlm.eval.vqa import normalize_answer, strip_answer, vqa_accuracy
from reference_code import load_reference

OFFICIAL = load_reference("salesforce-lavis", "lavis/common/vqa_tools/vqa_eval.py")
LMMS = load_reference("lmms-eval", "lmms_eval/tasks/_task_utils/vqa_eval_metric.py")
# lmms-eval's vqav2 task file; its logger and its package's __init__ (torch, datasets, ...) are never called
_TASK_UTILS = SimpleNamespace(__path__=[], file_utils=SimpleNamespace(), vqa_eval_metric=LMMS)
_PACKAGE = SimpleNamespace(__path__=[], tasks=SimpleNamespace(__path__=[], _task_utils=_TASK_UTILS))
LMMS_VQAV2 = load_reference("lmms-eval", "lmms_eval/tasks/vqav2/utils.py", stubs={
    "loguru": SimpleNamespace(logger=None), "lmms_eval": _PACKAGE, "lmms_eval.tasks": _PACKAGE.tasks,
    "lmms_eval.tasks._task_utils": _TASK_UTILS, "lmms_eval.tasks._task_utils.file_utils": _TASK_UTILS.file_utils,
    "lmms_eval.tasks._task_utils.vqa_eval_metric": LMMS,
})  # fmt: skip


def _answers(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [short_answer(rng) if rng.random() < 0.8 else free_text(rng) for _ in range(n)]


ANSWERS = _answers(5000, seed=0)


def official_normalize(text: str) -> str:
    """The official evaluate()'s steps for a prediction: newlines/tabs, strip, processPunctuation, processDigitArticle."""
    evaluator = OFFICIAL.VQAEval(n=2)
    return evaluator.processDigitArticle(evaluator.processPunctuation(strip_answer(text)))


def test_normalisation_equals_the_official_code_on_every_generated_answer():
    ours = [normalize_answer(a) for a in ANSWERS]
    assert ours == [official_normalize(a) for a in ANSWERS]
    # the set is not trivial: most answers change, in many different ways
    assert sum(o != a for o, a in zip(ours, ANSWERS, strict=True)) > 3000 and len(set(ours)) > 3000


def test_lmms_eval_methods_differ_only_on_repeated_commas_between_digits():
    # lmms-eval's vqav2 task calls process_punctuation + process_digit_article; its comma pattern is
    # (?<=\d)(,)+(?=\d), the official one (\d)(,)(\d): "1,,000" deletes every mark there, not here.
    processor = LMMS.EvalAIAnswerProcessor()
    differ = [a for a in ANSWERS
              if processor.process_digit_article(processor.process_punctuation(strip_answer(a))) != normalize_answer(a)]  # fmt: skip
    assert differ and all(re.search(r"\d,,+\d", a) and not re.search(r"\d,\d", a) for a in differ)


def test_lmms_eval_processor_call_differs_only_through_its_word_tokenize_step():
    # EvalAIAnswerProcessor.__call__ (lmms-eval's textvqa task) first deletes every "," and "?" and writes
    # "'s" as " 's": the official script does neither. Every disagreement holds one of those.
    processor = LMMS.EvalAIAnswerProcessor()
    differ = [a for a in ANSWERS if processor(a) != normalize_answer(a)]
    assert len(differ) > 200
    assert all("," in a or "?" in a or "'s" in a.lower() for a in differ)


class _Annotations:
    """The `vqa` / `vqaRes` objects VQAEval reads: `qa[question_id]` and `getQuesIds()`."""

    def __init__(self, qa: dict):
        self.qa = qa

    def getQuesIds(self) -> list[int]:  # noqa: N802 - the official API's name
        return list(self.qa)


def official_accuracies(questions: list[tuple[str, list[str]]]) -> list[float]:
    """Run the official evaluate() and return each question's unrounded accuracy."""
    gts = {i: {"answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)],
               "question_type": "what", "answer_type": "other"}
           for i, (_, answers) in enumerate(questions)}  # fmt: skip
    res = {i: {"answer": p} for i, (p, _) in enumerate(questions)}
    evaluator = OFFICIAL.VQAEval(_Annotations(gts), _Annotations(res), n=2)
    exact: dict[int, float] = {}
    evaluator.setEvalQA = exact.__setitem__  # the official one stores round(100 * acc, 2)
    evaluator.updateProgress = lambda progress: None
    evaluator.evaluate()
    return [exact[i] for i in range(len(questions))]


def generated_questions(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """Return (prediction, 10 human answers): crowds that agree 0..10 times, raw and normalised forms mixed."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        pool = [short_answer(rng) for _ in range(rng.randint(1, 4))]
        pool += [normalize_answer(a) for a in pool]  # the same answer as annotators and as models write it
        answers = [rng.choice(pool) for _ in range(10)] if rng.random() < 0.9 else [pool[0]] * 10
        prediction = rng.choice(pool + [short_answer(rng), free_text(rng)])
        questions.append((prediction, answers))
    return questions


QUESTIONS = generated_questions(3000, seed=1)


def test_accuracy_equals_the_official_evaluate_per_question_and_in_the_mean():
    ours = [vqa_accuracy(p, answers) for p, answers in QUESTIONS]
    theirs = official_accuracies(QUESTIONS)
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 1e-12
    # every level of agreement occurs, so the leave-one-out mean is exercised
    assert {round(s, 6) for s in ours} >= {0.0, 0.3, 0.6, 0.9, 1.0}
    samples = [Sample(str(i), "q", answers=answers) for i, (_, answers) in enumerate(QUESTIONS)]
    summary, _ = METRICS["vqa_accuracy"]([p for p, _ in QUESTIONS], samples)
    assert summary["vqa_accuracy"] == pytest.approx(sum(theirs) / len(theirs), abs=1e-12)


def test_always_normalize_is_lmms_eval_vqav2_rule():
    # lmms-eval's vqav2_process_results normalises the answers in full as well (its comma pattern aside)
    plain = [(p, a) for p, a in QUESTIONS[:1500] if ",," not in p + "".join(a)]
    ours = [vqa_accuracy(p, a, always_normalize=True) for p, a in plain]
    theirs = [LMMS_VQAV2.vqav2_process_results(
                  {"question_id": i, "answers": [{"answer": x, "answer_id": j} for j, x in enumerate(a)]}, [p]
              )["exact_match"] for i, (p, a) in enumerate(plain)]  # fmt: skip
    assert len(plain) > 1200
    assert max(abs(x - y) for x, y in zip(ours, theirs, strict=True)) <= 1e-12
