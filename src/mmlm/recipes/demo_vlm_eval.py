"""How `make demo` scores its VLM: VQA on the held-out world, the blind probe against the answer prior, and POPE.

VQA      greedy answers to questions about images of the held-out colour×shape pairs, words and chart bars
         (`shapes.split_world`), exact match after VQA normalisation, overall and per question type. The
         `val` stream is the one tuned on; `test` is scored once, at the end.
blind    the same test questions with a grey image: a model that reads the image falls to the answer prior,
         the accuracy of always giving each question type's most common training answer.
POPE     `mmlm eval vlm`'s built-in shapes-pope task through the same harness (random, popular and
         adversarial negatives): F1 and yes-ratio per split.
"""

from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from mmlm.data.synthetic.instructions import Instruction, make_instruction
from mmlm.data.synthetic.world import World
from mmlm.eval.backends import MMLMBackend
from mmlm.eval.harness import evaluate_vlm
from mmlm.eval.tasks import POPE_SPLITS, load_task
from mmlm.eval.vqa import answer_questions, normalize_answer, vqa_scores
from mmlm.inference.vlm import GenerativeModel

GREY = (128, 128, 128)


def questions(world: World, split: str, n: int, seed: int, image_size: int) -> list[Instruction]:
    """Return the first `n` instructions of (seed, split) about scenes of `world`."""
    return [make_instruction(i, seed, split=split, pairs=world, image_size=image_size) for i in range(n)]


def vqa_figures(loaded: GenerativeModel, samples: list[Instruction], blind: bool = False) -> dict[str, float]:
    """Return VQA accuracy overall and per type ("accuracy", "accuracy_count", ...); `blind`: grey images."""
    size = loaded.config.vision.image_size
    images = [Image.new("RGB", (size, size), GREY) if blind else s.image for s in samples]
    answers = answer_questions(loaded, images, [s.question for s in samples])
    return vqa_scores(answers, [[s.answer] for s in samples], [s.type for s in samples])


def answer_prior(train: list[Instruction], test: list[Instruction]) -> dict[str, float]:
    """Return the accuracy on `test` of answering each type's most common answer in `train`, overall and per type."""
    common: dict[str, Counter] = {}
    for s in train:
        common.setdefault(s.type, Counter())[normalize_answer(s.answer)] += 1
    hits: dict[str, list[bool]] = {}
    for s in test:
        guess = common[s.type].most_common(1)[0][0] if s.type in common else ""
        hits.setdefault(s.type, []).append(guess == normalize_answer(s.answer))
    figures = {f"accuracy_{t}": sum(h) / len(h) for t, h in sorted(hits.items())}
    figures["accuracy"] = sum(sum(h) for h in hits.values()) / len(test)
    return figures


def pope_summary(loaded: GenerativeModel, cache_dir: Path, limit: int) -> dict[str, float]:
    """Return POPE F1 and yes-ratio per split (and overall) from `mmlm eval vlm`'s harness on shapes-pope."""
    task, samples = load_task("shapes-pope", limit, cache_dir)
    result = evaluate_vlm(MMLMBackend(loaded, "demo-vlm"), task, samples, batch_size=32, progress=False)
    metrics: dict[str, Any] = result["probes"]["normal"]["metrics"]
    out = {"pope_f1": metrics["f1"], "pope_yes_ratio": metrics["yes_ratio"], "pope_questions": len(samples)}
    for split in POPE_SPLITS:
        out[f"pope_f1_{split}"] = metrics[f"f1_{split}"]
        out[f"pope_yes_ratio_{split}"] = metrics[f"yes_ratio_{split}"]
    return out
