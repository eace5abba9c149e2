"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"), for the shapes world.

COCO captions are scored by `mmlm.eval.chair_coco` with the published COCO vocabulary; this module applies
the same reading to the shapes world's colours and shapes.

  CHAIR_i = hallucinated object mentions / all object mentions      (over every caption together)
  CHAIR_s = captions with at least one hallucinated mention / captions

As the authors' utils/chair.py (github.com/LisaAnne/Hallucination): captions are lower-cased and tokenised,
plural words singularised, two-word names joined ("plus sign"), synonyms mapped to their canonical word, and
every mention counts, repeated ones included. A mention is hallucinated when the image's ground-truth
objects do not hold it. Where chair.py would divide by zero (no mention at all) CHAIR_i is 0.

The vocabulary is the shapes world's colours × shapes (`CHAIR_SYNONYMS`, canonical words from
`mmlm.data.synthetic.scene`). A shape with a colour just before it (size words may sit between: "two small red
circles") is the object "red circle"; without one, "circle". Ground truth is `sample.meta["objects"]`, a list
like ["red circle", "blue squares"] read with the same rules. "red circle" is grounded by a ground-truth
"red circle" or a colourless "circle"; a colourless "circle" by any circle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmlm.data.synthetic.scene import COLORS, SHAPES
from mmlm.errors import InputError

# canonical word -> every word that names it (the canonical one first), as chair.py's synonyms.txt rows
CHAIR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "dot", "ring"),
    "square": ("square", "box", "block", "rectangle", "cube"),
    "triangle": ("triangle", "pyramid"),
    "star": ("star", "pentagram"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "hexagon": ("hexagon",),
    "cross": ("cross", "plus", "plus sign", "x shape"),
    "heart": ("heart",),
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "lime"),
    "blue": ("blue", "navy"),
    "yellow": ("yellow", "gold", "golden"),
    "purple": ("purple", "violet", "magenta", "lilac"),
    "orange": ("orange", "amber"),
    "white": ("white", "ivory"),
    "cyan": ("cyan", "turquoise", "aqua", "teal"),
}
# words that may stand between a colour and its shape: "a large red circle", "a red, small circle"
MODIFIERS = frozenset(("small", "large", "big", "tiny", "little", "huge", "bright", "dark", "light", "pale"))

_CANONICAL = {synonym: word for word, synonyms in CHAIR_SYNONYMS.items() for synonym in synonyms}
_DOUBLE_WORDS = {s: s.replace(" ", "_") for s in _CANONICAL if " " in s}
_CANONICAL.update({s.replace(" ", "_"): w for s, w in _CANONICAL.items() if " " in s})
_WORD = re.compile(r"[a-z_]+")


def singular(word: str) -> str:
    """Return the vocabulary word a plural names ("crosses" -> "cross", "boxes" -> "box"), else `word`."""
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: len(word) - len(suffix)] + replacement in _CANONICAL:
            return word[: len(word) - len(suffix)] + replacement
    return word


def object_mentions(text: str) -> list[str]:
    """Return the objects a text mentions, in order, repeats kept: "two red circles and a box" -> ["red circle", "square"]."""
    text = text.lower()
    for phrase, joined in _DOUBLE_WORDS.items():
        text = re.sub(rf"\b{phrase}(e?s)?\b", joined, text)
    words = [_CANONICAL.get(singular(w), singular(w)) for w in _WORD.findall(text)]
    mentions = []
    for i, word in enumerate(words):
        if word not in SHAPES:
            continue
        j = i - 1
        while j >= 0 and words[j] in MODIFIERS:
            j -= 1
        colour = words[j] if j >= 0 and words[j] in COLORS else None
        mentions.append(f"{colour} {word}" if colour else word)
    return mentions


def ground_truth_objects(objects: Sequence[str], sample_id: str = "?") -> set[str]:
    """Return the canonical objects of a sample's `meta["objects"]`; InputError for a word outside the vocabulary."""
    if isinstance(objects, str):
        raise InputError(f"sample {sample_id}: objects must be a list of object names, got {objects!r}")
    found: set[str] = set()
    for name in objects:
        mentions = object_mentions(str(name))
        if not mentions:
            raise InputError(
                f"sample {sample_id}: object {name!r} names no shapes-world object "
                f"(shapes: {', '.join(SHAPES)})"
            )
        found.update(mentions)
    return found


def hallucinated(mention: str, truth: set[str]) -> bool:
    """Return True when the ground-truth objects do not hold the mentioned one (see the module docstring)."""
    shape = mention.rsplit(" ", 1)[-1]
    if mention == shape:
        return not any(t.rsplit(" ", 1)[-1] == shape for t in truth)
    return mention not in truth and shape not in truth


def chair_scores(
    captions: Sequence[str], objects: Sequence[Sequence[str]], ids: Sequence[str] | None = None
) -> dict[str, float]:
    """Return {"chair_i", "chair_s"} of captions against each one's ground-truth objects (fractions, not %)."""
    mentions = hallucinations = hallucinated_captions = 0
    ids = ids if ids is not None else [str(i) for i in range(len(captions))]
    for caption, names, sample_id in zip(captions, objects, ids, strict=True):
        truth = ground_truth_objects(names, sample_id)
        said = object_mentions(caption)
        wrong = sum(hallucinated(m, truth) for m in said)
        mentions += len(said)
        hallucinations += wrong
        hallucinated_captions += wrong > 0
    return {
        "chair_i": hallucinations / mentions if mentions else 0.0,
        "chair_s": hallucinated_captions / len(captions) if captions else 0.0,
    }
