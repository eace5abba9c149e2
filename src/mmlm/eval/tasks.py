"""VLM evaluation tasks: a `Task` that says how to prompt, parse and score its samples (a `Sample` per question,
read from a samples file by `mmlm.eval.samples`), the task files, and the built-in shapes-world tasks.

Tasks are data: a JSON or YAML file holding the `Task` fields, whose `data` names a samples file relative to
the task file, is loaded exactly as a built-in is (`load_task`). Public benchmarks become such files through
`convert` (the converters are in `mmlm.eval.official_formats`).

Built-in tasks are generated offline and deterministically on first use, into <cache_dir>/<name>/ (PNG images
and samples.jsonl). Like `make demo`'s own evaluation they ask about images of the instruction data's test
split (`split="test"`) drawn from the train-split colour×shape pairs (seed 0, 32-pixel images), so a demo
model is scored on images it never saw, in the question wording it was trained on.
"""

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from mmlm.data.synthetic.instructions import SPLITS, Instruction, make_instruction
from mmlm.data.synthetic.shapes import COLORS, Scene, caption, render, sample_scene, split_combinations
from mmlm.errors import InputError
from mmlm.eval.samples import LETTERS, Sample, read_samples, write_samples

PLACEHOLDER = re.compile(r"\{(question|choices)\}")
TASK_FILE_SUFFIXES = (".json", ".yaml", ".yml")
DEFAULT_CACHE_DIR = Path("runs/eval_data")
MULTIPLE_CHOICE_PROMPT = (
    "{question}\n{choices}\nAnswer with the option's letter from the given choices directly."
)


def render_choices(choices: Sequence[str]) -> str:
    """Return the options as lines "A. first\\nB. second..."."""
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=False))


@dataclass
class Task:
    """An evaluation task: its samples file and how each sample is prompted, parsed and scored."""

    name: str
    data: str  # path of the task's data file (JSONL or TSV)
    prompt: str  # template with {question} and optionally {choices}
    parser: str  # a name in mmlm.eval.parsers.PARSERS
    metric: str  # a name in mmlm.eval.metrics.METRICS
    max_new_tokens: int = 16

    def render_prompt(self, sample: Sample) -> str:
        """Return the template filled with the sample's question and choices (the runner adds the image)."""

        def fill(match: re.Match) -> str:
            if match.group(1) == "question":
                return sample.question
            if sample.choices is None:
                raise InputError(
                    f"task {self.name}: the prompt uses {{choices}} but sample {sample.id!r} has none"
                )
            return render_choices(sample.choices)

        # one pass, so a question that happens to contain "{choices}" is left as written
        return PLACEHOLDER.sub(fill, self.prompt)


# ---- task files ----


def task_from_dict(data: Any, source: Path) -> Task:
    """Return the Task described by a task file's contents; `data` is resolved against the file's folder."""
    names = [f.name for f in fields(Task)]
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with the task fields {', '.join(names)}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"{source}: unknown field(s) {unknown}; expected {', '.join(names)}")
    data = {"name": source.stem, **data}
    for name in ("name", "data", "prompt", "parser", "metric"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise InputError(f"{source}: {name}: expected a non-empty string, got {data.get(name)!r}")
    tokens = data.get("max_new_tokens", 16)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise InputError(f"{source}: max_new_tokens: expected a positive integer, got {tokens!r}")
    if "{question}" not in data["prompt"]:
        raise InputError(
            f"{source}: prompt: expected a template containing {{question}}, got {data['prompt']!r}"
        )
    return Task(**{**data, "data": os.path.abspath(os.path.join(source.parent, data["data"]))})


def read_task(path: str | Path) -> Task:
    """Return the task a JSON or YAML task file describes (its `data` relative to the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read the task file ({error.strerror})") from None
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise InputError(
            f"{path}: invalid {path.suffix[1:].upper()} ({' '.join(str(error).split())})"
        ) from None
    return task_from_dict(data, path)


def load_task(
    spec: str, limit: int | None = None, cache_dir: Path | None = None
) -> tuple[Task, list[Sample]]:
    """Return a task and its first `limit` samples: a built-in (generated into cache_dir/<name>) or a task file."""
    if spec in BUILTIN_TASKS:
        data = write_shapes_task(spec, Path(cache_dir or DEFAULT_CACHE_DIR) / spec)
        task = replace(BUILTIN_TASKS[spec], data=str(data))
    else:
        path = Path(spec)
        if path.is_dir() and (path / "task.json").is_file():  # a folder `convert` wrote
            path = path / "task.json"
        if path.suffix.lower() not in TASK_FILE_SUFFIXES:
            raise InputError(
                f"unknown task {spec!r}: expected a built-in task ({', '.join(BUILTIN_TASKS)}) "
                f"or a task file ({', '.join(TASK_FILE_SUFFIXES)})"
            )
        if not path.is_file():
            raise InputError(f"{spec}: task file not found")
        task = read_task(path)
    return task, read_samples(task.data, limit)


# ---- built-in shapes-world tasks ----

SHAPES_SEED = 0  # `make demo` and VLMTrainConfig's default seed
SHAPES_HOLDOUT_FRACTION = 0.25
SHAPES_IMAGE_SIZE = 32  # the demo VLM's input size, so its images are seen as in training
DEFAULT_SIZE = 200
SHAPES_TASKS_VERSION = 1  # bump when a generator changes, so cached sets are rebuilt
POPE_SPLITS = ("random", "popular", "adversarial")
_STREAMS = {"shapes-pope": 101, "shapes-mc": 102, "shapes-mc-layout": 103, "shapes-caption": 104}
Generated = tuple[list[Sample], dict[str, Image.Image]]  # samples and their images by relative path


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    # the test split's stream, kept apart from make_instruction's [seed, split, index]
    return np.random.default_rng([seed, SPLITS["test"], _STREAMS[stream], index])


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _objects(scene: Scene) -> list[str]:
    return sorted(f"{color} {shape}" for color, shape in scene.pairs())


def _instructions(
    name: str, types: Sequence[str], size: int, pairs: list
) -> tuple[list[Instruction], Generated]:
    """Return the test split's instructions of `types` and, from them, one-answer samples and their images."""
    weights = dict.fromkeys(types, 1.0)
    items = [make_instruction(i, SHAPES_SEED, split="test", pairs=pairs, image_size=SHAPES_IMAGE_SIZE,
                              type_weights=weights) for i in range(size)]  # fmt: skip
    images = {f"images/{i:06d}.png": item.image for i, item in enumerate(items)}
    samples = [
        Sample(f"{name}-{i:04d}", item.question, image, [item.answer], type=item.type,
               meta={"image_id": i, "objects": _objects(item.scene)})
        for i, (item, image) in enumerate(zip(items, images, strict=True))
    ]  # fmt: skip
    return items, (samples, images)


def _short_answer(name: str, types: Sequence[str]) -> Callable[[int, list], Generated]:
    return lambda size, pairs: _instructions(name, types, size, pairs)[1]


def _pope(size: int, pairs: list) -> Generated:
    """POPE (Li et al. 2023) on shapes: per image one present object ("yes") and, per split, one absent one.

    random: any absent pair; popular: the absent pair shown in most images of the set (POPE's top-k frequent
    objects); adversarial: an absent pair sharing a colour or shape with a present one. POPE ranks adversarial
    negatives by co-occurrence with the present objects; shapes scenes co-occur at random, so the near miss
    is what makes a negative hard here, and one is drawn at random among them.
    """
    rngs = [_rng(SHAPES_SEED, "shapes-pope", j) for j in range(-(-size // (2 * len(POPE_SPLITS))))]
    scenes = [sample_scene(rng, pairs, "objects") for rng in rngs]
    shown = Counter(pair for scene in scenes for pair in scene.pairs())
    by_frequency = sorted(pairs, key=lambda pair: -shown[pair])  # stable: canonical order breaks ties
    samples, images = [], {}
    for j, (rng, scene) in enumerate(zip(rngs, scenes, strict=True)):
        present = scene.pairs()
        absent = [pair for pair in pairs if pair not in present]
        near = [p for p in absent if any(p[0] == color or p[1] == shape for color, shape in present)]
        negatives = {"random": _pick(rng, absent), "popular": next(p for p in by_frequency if p not in present),
                     "adversarial": _pick(rng, near)}  # fmt: skip
        yes = _pick(rng, sorted(present))
        images[image := f"images/{j:06d}.png"] = render(scene, SHAPES_IMAGE_SIZE)
        for split in POPE_SPLITS:  # image-major, so any even `limit` keeps yes and no balanced
            for answer, (color, shape) in (("yes", yes), ("no", negatives[split])):
                meta = {"pope_split": split, "image_id": j, "objects": _objects(scene)}
                question = f"Is there a {color} {shape} in the image?"  # the instruction data's wording
                sample_id = f"shapes-pope-{split}-{j:04d}-{answer}"
                samples.append(
                    Sample(sample_id, question, image, [answer], label=answer, type=split, meta=meta)
                )
    return samples[:size], images


def _caption(size: int, pairs: list) -> Generated:
    """Captions: the canonical `describe` caption (the trained answer) first, then up to two templated paraphrases."""
    items, (samples, images) = _instructions("shapes-caption", ["caption"], size, pairs)
    for i, (item, sample) in enumerate(zip(items, samples, strict=True)):
        rng = _rng(SHAPES_SEED, "shapes-caption", i)
        for _ in range(8):
            text = caption(item.scene, rng)
            if text not in sample.answers and len(sample.answers) < 3:
                sample.answers.append(text)
    return samples, images


def _multiple_choice(size: int, pairs: list) -> Generated:
    """Colour questions with four options, the answer and three other colours; each block of four samples has
    its answers at A, B, C and D once, in a random order."""
    _, (samples, images) = _instructions("shapes-mc", ["color"], size, pairs)
    for i, sample in enumerate(samples):
        position = int(_rng(SHAPES_SEED, "shapes-mc-layout", i // 4).permutation(4)[i % 4])
        others = [c for c in COLORS if c != sample.answers[0]]
        choices = [others[k] for k in _rng(SHAPES_SEED, "shapes-mc", i).choice(len(others), 3, replace=False)]
        choices.insert(position, sample.answers[0])
        sample.choices, sample.label = choices, LETTERS[position]
    return samples, images


_SHORT = ["count", "color", "relation", "presence", "text", "chart"]
_GENERATORS: dict[str, Callable[[int, list], Generated]] = {
    "shapes-vqa": _short_answer("shapes-vqa", _SHORT),
    "shapes-count": _short_answer("shapes-count", ["count"]),
    "shapes-spatial": _short_answer("shapes-spatial", ["relation"]),
    "shapes-ocr": _short_answer("shapes-ocr", ["text"]),
    "shapes-chart": _short_answer("shapes-chart", ["chart"]),
    "shapes-pope": _pope,
    "shapes-caption": _caption,
    "shapes-mc": _multiple_choice,
}


def _builtin(
    name: str, parser: str, metric: str, prompt: str = "{question}", max_new_tokens: int = 16
) -> Task:
    return Task(name, str(DEFAULT_CACHE_DIR / name / "samples.jsonl"), prompt, parser, metric, max_new_tokens)


# One reference answer each: "exact_match" is VQA accuracy's single-answer case (exact after VQA normalisation).
BUILTIN_TASKS: dict[str, Task] = {
    "shapes-vqa": _builtin("shapes-vqa", "vqa", "exact_match"),
    "shapes-count": _builtin("shapes-count", "number", "exact_match"),
    "shapes-spatial": _builtin("shapes-spatial", "yes_no", "exact_match"),
    "shapes-ocr": _builtin("shapes-ocr", "vqa", "exact_match"),
    "shapes-chart": _builtin("shapes-chart", "vqa", "relaxed_accuracy"),
    "shapes-pope": _builtin("shapes-pope", "yes_no", "pope"),
    "shapes-caption": _builtin("shapes-caption", "caption", "caption", max_new_tokens=96),
    "shapes-mc": _builtin("shapes-mc", "option_letter", "multiple_choice", MULTIPLE_CHOICE_PROMPT),
}


def write_shapes_task(name: str, out_dir: Path, size: int = DEFAULT_SIZE) -> Path:
    """Return out_dir/samples.jsonl of built-in task `name`, generating it (with its PNGs) unless it is there."""
    if name not in _GENERATORS:
        raise InputError(f"unknown built-in task {name!r}: expected one of {', '.join(_GENERATORS)}")
    out_dir = Path(out_dir)
    data, stamp_path = out_dir / "samples.jsonl", out_dir / "generator.json"
    stamp = {"task": name, "version": SHAPES_TASKS_VERSION, "size": size, "seed": SHAPES_SEED,
             "holdout_fraction": SHAPES_HOLDOUT_FRACTION, "image_size": SHAPES_IMAGE_SIZE}  # fmt: skip
    try:
        if data.is_file() and json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
            return data
    except (OSError, ValueError):
        pass  # no stamp or a broken one: generate again
    data.unlink(missing_ok=True)  # written last, so a stamp never vouches for an older set
    train_pairs, _ = split_combinations(SHAPES_SEED, SHAPES_HOLDOUT_FRACTION)
    samples, images = _GENERATORS[name](size, train_pairs)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for relative, image in images.items():
        image.save(out_dir / relative, format="PNG")
    stamp_path.write_text(json.dumps(stamp) + "\n", encoding="utf-8")
    return write_samples(samples, data)
