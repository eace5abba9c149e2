"""Shapes-world instruction data: an image, a question, a short answer and the question's type.

Every answer is read from the `Scene`, never from pixels, and is one word or number ("red", "2", "yes"),
except captions, whose answer is the canonical `describe(scene)`. Question types:
    caption   "Describe the image."                        -> describe(scene)
    count     "How many circles are there?"                -> "0".."9"
    color     "What color is the square?"                  -> a colour (the shape occurs once)
    relation  "Is the red triangle to the left of the blue star?" -> yes | no
    presence  "Is there a green circle in the image?"      -> yes | no (no: an absent pair, often a near miss)
    text      "What word is written?"                      -> the word
    chart     "Which bar is the tallest?" | "What is the value of the red bar?" -> a colour | a number
Yes/no answers are drawn 50/50 before the question is built. Samples are deterministic in (seed, split,
index); object scenes use only the given colour×shape pairs, so `split_combinations` holds pairs out of
training exactly as it does for captions. `write_instructions` writes the LLaVA conversations JSON and the
VQA-style JSONL manifest; `text_corpus` gives text-only sentences for briefly pre-training a tiny LM.
"""

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmlm.data.conversations import llava_record
from mmlm.data.synthetic.shapes import (
    KINDS,
    SHAPES,
    Scene,
    ShapeObject,
    all_pairs,
    caption,
    describe,
    relation_holds,
    render,
    sample_scene,
    split_combinations,
)
from mmlm.data.synthetic.world import World, as_world
from mmlm.errors import InputError

QUESTION_TYPES: tuple[str, ...] = ("caption", "count", "color", "relation", "presence", "text", "chart")
SPLITS = {"train": 10, "test": 11, "heldout": 12, "val": 14}  # random streams, apart from shapes.py's 0, 1, 2
_CORPUS_STREAM, _FOLLOW_UP_STREAM = 13, 15
# the question types a scene of each kind can answer (captions aside)
FOLLOW_UPS = {"objects": ("count", "color", "relation", "presence"), "text": ("text",), "chart": ("chart",)}
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
_SCENE_KIND = {"text": "text", "chart": "chart"}  # every other type asks about an object scene
_CAPTION_KINDS = {"objects": 0.6, "text": 0.2, "chart": 0.2}
_MAX_DRAWS = 100


@dataclass(frozen=True)
class Instruction:
    """One instruction sample: the rendered image, a question about it, its short answer and the type."""

    image: Image.Image
    question: str
    answer: str
    type: str
    scene: Scene


def plural(shape: str) -> str:
    """Return the shape's plural ("circles", "crosses")."""
    return shape + ("es" if shape.endswith("s") else "s")


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _name(o: ShapeObject) -> str:
    return f"{o.color} {o.shape}"


def _count(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    present = sorted({o.shape for o in scene.objects})
    absent = [s for s in SHAPES if s not in present]
    repeated = [s for s in present if scene.count(shape=s) > 1]
    draw = rng.random()  # 20% an absent shape ("0"), 40% a repeated one when there is one, else any present
    if absent and draw < 0.2:
        shape = _pick(rng, absent)
    else:
        shape = _pick(rng, repeated if repeated and draw < 0.6 else present)
    return f"How many {plural(shape)} are there?", str(scene.count(shape=shape))


def _color(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    once = [o for o in scene.objects if scene.count(shape=o.shape) == 1]
    if not once:
        return None
    obj = _pick(rng, once)
    return f"What color is the {obj.shape}?", obj.color


def _relation(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    # Only objects whose colour×shape is unique can be named; "no" asks the opposite of a relation that holds
    # by the margin, so both answers are clear-cut.
    unique = [o for o in scene.objects if scene.count(shape=o.shape, color=o.color) == 1]
    holding = [
        (a, r, b) for a in unique for b in unique if a is not b for r in OPPOSITE if relation_holds(a, r, b)
    ]
    if not holding:
        return None
    a, held, b = _pick(rng, holding)
    yes = rng.random() < 0.5
    return f"Is the {_name(a)} {held if yes else OPPOSITE[held]} the {_name(b)}?", "yes" if yes else "no"


def _presence(
    scene: Scene, rng: np.random.Generator, pairs: Sequence[tuple[str, str]]
) -> tuple[str, str] | None:
    present = scene.pairs()
    if rng.random() < 0.5:
        color, shape = _pick(rng, sorted(present))
        return f"Is there a {color} {shape} in the image?", "yes"
    absent = [p for p in pairs if p not in present]
    if not absent:
        return None
    # Half the "no" questions are near misses (POPE's adversarial probes): a present colour or shape.
    near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
    color, shape = _pick(rng, near if near and rng.random() < 0.5 else absent)
    return f"Is there a {color} {shape} in the image?", "no"


def _chart(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    chart = scene.chart
    if rng.random() < 0.5:
        return "Which bar is the tallest?", chart.tallest()
    label = _pick(rng, chart.labels)
    return f"What is the value of the {label} bar?", str(chart.height_of(label))


def ask(
    scene: Scene, question_type: str, rng: np.random.Generator, pairs: Sequence[tuple[str, str]]
) -> tuple[str, str] | None:
    """Return a (question, answer) of `question_type` true of `scene`, or None if the scene cannot support one."""
    if question_type == "caption":
        return "Describe the image.", describe(scene)
    if question_type == "text":
        return ("What word is written?", scene.word.word) if scene.word is not None else None
    if question_type == "chart":
        return _chart(scene, rng) if scene.chart is not None else None
    if not scene.objects:
        return None
    if question_type == "count":
        return _count(scene, rng)
    if question_type == "color":
        return _color(scene, rng)
    if question_type == "relation":
        return _relation(scene, rng)
    return _presence(scene, rng, pairs)


def _check(split: str, type_weights: Mapping[str, float] | None) -> None:
    if split not in SPLITS:
        raise InputError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    if type_weights is not None and (
        set(type_weights) - set(QUESTION_TYPES)
        or any(w < 0 for w in type_weights.values())
        or sum(type_weights.values()) <= 0
    ):
        raise InputError(
            f"type_weights: expected non-negative weights for {QUESTION_TYPES}, got {dict(type_weights)}"
        )


def make_instruction(
    index: int,
    seed: int,
    *,
    split: str = "train",
    pairs: Sequence[tuple[str, str]] | World | None = None,
    image_size: int = 32,
    type_weights: Mapping[str, float] | None = None,
    max_objects: int = 4,
) -> Instruction:
    """Return instruction sample `index` of (seed, split); it depends on nothing else, so streams resume."""
    _check(split, type_weights)
    world = as_world(pairs if pairs is not None else all_pairs())
    rng = np.random.default_rng([seed, SPLITS[split], index])
    weights = dict(type_weights or dict.fromkeys(QUESTION_TYPES, 1.0))
    types = [t for t in QUESTION_TYPES if weights.get(t, 0) > 0]
    p = np.array([weights[t] for t in types]) / sum(weights[t] for t in types)
    question_type = types[int(rng.choice(len(types), p=p))]
    for _ in range(_MAX_DRAWS):  # redraw scenes that cannot support the question (e.g. no unique shape)
        kind = _SCENE_KIND.get(question_type, "objects")
        if question_type == "caption":
            kind = KINDS[int(rng.choice(len(KINDS), p=[_CAPTION_KINDS[k] for k in KINDS]))]
        scene = sample_scene(rng, world, kind, max_objects)
        qa = ask(scene, question_type, rng, world.pairs)
        if qa is not None:
            return Instruction(render(scene, image_size), qa[0], qa[1], question_type, scene)
    raise InputError(
        f"pairs: no {question_type} question found in {_MAX_DRAWS} scenes; allow more pairs or objects"
    )


def conversation_turns(
    sample: Instruction,
    turns: int,
    seed: int,
    index: int,
    pairs: Sequence[tuple[str, str]] | World,
    question_types: Sequence[str] | None = None,
) -> tuple[tuple[str, str], ...]:
    """Return the sample's (question, answer) and up to `turns` - 1 more, distinct, about the same scene, of
    `question_types` only when given (a curriculum stage's follow-ups stay within its types).

    Several questions per image give the LM several supervised answers for one pass of the vision tower.
    """
    rng = np.random.default_rng([seed, _FOLLOW_UP_STREAM, index])
    types, world = FOLLOW_UPS[sample.scene.kind], as_world(pairs)
    if question_types is not None:
        types = tuple(t for t in types if t in question_types)
    out = [(sample.question, sample.answer)]
    if not types:
        return tuple(out)
    for _ in range(4 * turns):  # a scene may support fewer distinct questions than asked for
        if len(out) >= turns:
            break
        qa = ask(sample.scene, types[int(rng.integers(len(types)))], rng, world.pairs)
        if qa is not None and qa[0] not in {q for q, _ in out}:
            out.append(qa)
    return tuple(out)


def generate_instructions(n: int, seed: int, *, start: int = 0, **options: Any) -> Iterator[Instruction]:
    """Yield instruction samples start, ..., start + n - 1 of (seed, split); options as `make_instruction`."""
    for index in range(start, start + n):
        yield make_instruction(index, seed, **options)


def instruction_splits(
    seed: int, n_train: int, n_test: int, *, holdout_fraction: float = 0.25, **options: Any
) -> dict[str, list[Instruction]]:
    """Return "train" and "test" (train pairs, separate streams) and "heldout" (held-out pairs only) samples."""
    train_pairs, heldout_pairs = split_combinations(seed, holdout_fraction)
    plan = {
        "train": (n_train, train_pairs),
        "test": (n_test, train_pairs),
        "heldout": (n_test, heldout_pairs),
    }
    return {
        split: list(generate_instructions(n, seed, split=split, pairs=pairs, **options))
        for split, (n, pairs) in plan.items()
        if pairs
    }


@dataclass(frozen=True)
class InstructionFiles:
    """The two files `write_instructions` writes for one split."""

    conversations: Path  # LLaVA conversations JSON (a list)
    vqa: Path  # VQA-style JSONL manifest


def write_instructions(
    out_dir: str | Path, instructions: Sequence[Instruction], name: str = "train"
) -> InstructionFiles:
    """Write images/<name>/*.png, <name>_conversations.json and <name>_vqa.jsonl under out_dir; return their paths."""
    out_dir = Path(out_dir)
    (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
    records, lines = [], []
    for i, sample in enumerate(instructions):
        image = f"images/{name}/{i:06d}.png"
        sample.image.save(out_dir / image, format="PNG", compress_level=1)
        sample_id = f"{name}-{i:06d}"
        messages = [
            {"role": "user", "content": f"<image>\n{sample.question}"},
            {"role": "assistant", "content": sample.answer},
        ]
        records.append(llava_record(messages, [image], sample_id))
        vqa = {"id": sample_id, "image": image, "question": sample.question, "answers": [sample.answer]}
        lines.append(json.dumps({**vqa, "type": sample.type}))
    files = InstructionFiles(out_dir / f"{name}_conversations.json", out_dir / f"{name}_vqa.jsonl")
    files.conversations.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    files.vqa.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return files


def write_instruction_splits(
    out_dir: str | Path, seed: int, n_train: int, n_test: int, **options: Any
) -> dict[str, InstructionFiles]:
    """Write `instruction_splits` (train, test, heldout) under out_dir; return each split's files."""
    splits = instruction_splits(seed, n_train, n_test, **options)
    return {name: write_instructions(out_dir, samples, name) for name, samples in splits.items()}


def text_corpus(
    n: int, seed: int, *, pairs: Sequence[tuple[str, str]] | World | None = None, max_objects: int = 4
) -> list[str]:
    """Return n templated sentences about random scenes (captions, and questions with their answers)."""
    world = as_world(pairs if pairs is not None else all_pairs())
    sentences = []
    for index in range(n):
        rng = np.random.default_rng([seed, _CORPUS_STREAM, index])
        kind = KINDS[int(rng.choice(len(KINDS), p=[_CAPTION_KINDS[k] for k in KINDS]))]
        scene = sample_scene(rng, world, kind, max_objects)
        form = int(rng.integers(3))
        if form == 0:
            sentences.append(f"The image shows {describe(scene)}.")
        elif form == 1:
            sentences.append(f"{caption(scene, rng).capitalize()}.")
        else:
            question_type = {"text": "text", "chart": "chart"}.get(kind) or _pick(rng, QUESTION_TYPES[1:5])
            qa = ask(scene, question_type, rng, world.pairs) or ("Describe the image.", describe(scene))
            sentences.append(f"{qa[0]} {qa[1]}.")
    return sentences


def write_text_corpus(path: str | Path, n: int, seed: int, **options: Any) -> Path:
    """Write `text_corpus(n, seed, **options)` to `path`, one sentence per line; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in text_corpus(n, seed, **options)), encoding="utf-8")
    return path


def answer_counts(instructions: Sequence[Instruction]) -> dict[str, Counter]:
    """Return, per question type, how often each answer occurs (to check balance and priors)."""
    counts: dict[str, Counter] = {}
    for sample in instructions:
        counts.setdefault(sample.type, Counter())[sample.answer] += 1
    return counts
