"""How `make demo` scores its VLM: VQA on the held-out world, the image probes against the answer prior, and POPE.

VQA        greedy answers to questions about images of the held-out colour×shape pairs, words and chart bars
           (`shapes.split_world`), exact match after VQA normalisation, overall and per question type. The
           `val` stream is the one tuned on; `test` is scored once, at the end. "Describe the image." is not a
           question with one short answer: its replies are scored apart, with CIDEr-D against the scene's
           canonical description (`caption_cider`; `accuracy_caption` is their exact match), and the overall
           accuracy is over the questions only (`accuracy_with_captions` keeps the exact match over both, as the
           demo reported it before).
blind      the same test questions with a grey image (`mmlm eval vlm --blind`'s probe).
text_only  the same test questions with no image in the prompt (the harness's `text_only` probe, MMStar's
           "LVLM without visual input"): what the language model answers from the question alone. Both probes
           sit beside the answer prior, the accuracy of always giving each question type's most common
           training answer: a model that reads the image falls to or below it without one.
POPE       `mmlm eval vlm`'s built-in shapes-pope task through the same harness (random, popular and
           adversarial negatives): F1 and yes-ratio per split.
"""

from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from mmlm.data.synthetic.instructions import Instruction, make_instruction
from mmlm.data.synthetic.world import World
from mmlm.eval.backends import MMLMBackend
from mmlm.eval.captioning import caption_scores
from mmlm.eval.harness import evaluate_vlm
from mmlm.eval.tasks import POPE_SPLITS, load_task
from mmlm.eval.vqa import answer_questions, normalize_answer, vqa_scores
from mmlm.inference.vlm import GenerativeModel

GREY = (128, 128, 128)


def questions(world: World, split: str, n: int, seed: int, image_size: int) -> list[Instruction]:
    """Return the first `n` instructions of (seed, split) about scenes of `world`."""
    return [make_instruction(i, seed, split=split, pairs=world, image_size=image_size) for i in range(n)]


def vqa_figures(
    loaded: GenerativeModel, samples: list[Instruction], probe: str = "normal"
) -> dict[str, float]:
    """Return VQA accuracy over the questions and per type ("accuracy", "accuracy_count", ...), the exact match
    over questions and captions together ("accuracy_with_captions"), and the captions' exact match
    ("accuracy_caption", not part of "accuracy") and CIDEr-D ("caption_cider");
    `probe`: "normal" (each sample's image), "blind" (a grey image) or "text_only" (no image)."""
    size = loaded.config.vision.image_size
    images = {"normal": [s.image for s in samples], "blind": [Image.new("RGB", (size, size), GREY)] * len(samples),
              "text_only": None}[probe]  # fmt: skip
    answers = answer_questions(loaded, images, [s.question for s in samples])
    every = vqa_scores(answers, [[s.answer] for s in samples], [s.type for s in samples])
    asked = [(a, s) for a, s in zip(answers, samples, strict=True) if s.type != "caption"]
    figures = vqa_scores([a for a, _ in asked], [[s.answer] for _, s in asked], [s.type for _, s in asked])
    figures["accuracy_with_captions"] = every["accuracy"]
    described = [(a, s) for a, s in zip(answers, samples, strict=True) if s.type == "caption"]
    if described:
        scores, _ = caption_scores([a for a, _ in described], [[s.answer] for _, s in described])
        figures.update(accuracy_caption=every["accuracy_caption"], caption_cider=float(scores["cider"]))
    return figures


def answer_prior(train: list[Instruction], test: list[Instruction]) -> dict[str, float]:
    """Return the accuracy on `test`'s questions (captions aside, as in vqa_figures) of answering each type's
    most common answer in `train`, overall and per type."""
    common: dict[str, Counter] = {}
    for s in train:
        common.setdefault(s.type, Counter())[normalize_answer(s.answer)] += 1
    hits: dict[str, list[bool]] = {}
    for s in test:
        if s.type == "caption":
            continue
        guess = common[s.type].most_common(1)[0][0] if s.type in common else ""
        hits.setdefault(s.type, []).append(guess == normalize_answer(s.answer))
    figures = {f"accuracy_{t}": sum(h) / len(h) for t, h in sorted(hits.items())}
    figures["accuracy"] = sum(sum(h) for h in hits.values()) / max(1, sum(len(h) for h in hits.values()))
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
