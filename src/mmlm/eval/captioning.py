"""Caption metrics: BLEU-1..4 and CIDEr-D as the COCO caption evaluation computes them, plus CHAIR.

The scorers are pycocoevalcap's own (`Bleu(4)`, BLEU with the "closest" reference length, and `Cider`, which
is CIDEr-D: clipped n-gram counts, a Gaussian length penalty σ = 6, ×10; Vedantam et al. 2015), run on
captions tokenised as the COCO evaluation does: Stanford PTBTokenizer (the jar pycocoevalcap ships, run
with -preserveLines -lowerCase) and then its punctuation tokens removed. That needs `java`; without it
`python_tokenize` stands in and the summary says which one ran ("tokenizer": "ptb-java" | "python-fallback").
IDF in CIDEr-D comes from the references of the scored set, so scores depend on the set, as in the official
code. Figures are fractions (CIDEr-D 1.0 is the "100" papers print).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmlm.errors import InputError
from mmlm.eval.chair import chair_scores
from mmlm.eval.chair_coco import coco_chair_scores

if TYPE_CHECKING:
    from mmlm.eval.tasks import Sample

TOKENIZERS = ("auto", "ptb-java", "python-fallback")


def java_available() -> bool:
    """Return True when a `java` executable is on PATH (the PTB tokenizer needs it)."""
    return shutil.which("java") is not None


def _ptb_punctuation() -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return PUNCTUATIONS


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Return captions tokenised exactly as pycocoevalcap's PTBTokenizer does (needs java).

    Same jar, flags and punctuation filter as pycocoevalcap/tokenizer/ptbtokenizer.py; the temporary file
    goes to the system temp folder rather than into site-packages, and the jar's stderr is captured.
    """
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    text = "\n".join(c.replace("\n", " ") for c in captions)
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode())
    try:
        cmd = [
            "java",
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
        ]
        done = subprocess.run([*cmd, f.name], capture_output=True, check=False)
    finally:
        os.remove(f.name)
    lines = done.stdout.decode().split("\n")
    if done.returncode != 0 or len(lines) < len(captions):
        raise RuntimeError(f"PTBTokenizer failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    punctuation = set(_ptb_punctuation())
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in punctuation)
        for line in lines[: len(captions)]
    ]


# PTB's bracket tokens; lower-cased by -lowerCase, so pycocoevalcap's filter ("-LRB-", ...) never removes them
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_PYTHON_TOKEN = re.compile(
    r"-(?:lrb|rrb|lsb|rsb|lcb|rcb)-"  # bracket tokens made above
    r"|[a-z]+(?=n't\b)|n't\b"  # "can't" -> "ca n't", as PTB splits it
    r"|'(?:s|re|ve|ll|d|m)\b"  # clitics: "man's" -> "man 's"
    r"|[a-z](?:\.[a-z])+\.?"  # abbreviations: "u.s.", "e.g."
    r"|\d+(?:[.,:/]\d+)*"  # numbers: "3.5", "1,000", "10:30"
    r"|@?\w+(?:[-/@&]\w+)*"  # words, hyphenated ones whole: "blue-square", "e-mail", "@home"
    r"|\.\.\.|[.!?]+|--+|\S"  # punctuation runs ("??", "..."), any other mark alone
)


def python_tokenize(captions: Sequence[str]) -> list[str]:
    """Return captions tokenised like the PTB tokenizer without java: lower-case, PTB-style splits, punctuation out.

    Agrees with `ptb_tokenize` on plain captions (words, hyphens, clitics, numbers, sentence punctuation,
    quotes, brackets); known differences: "<tag>" becomes "< tag >", an apostrophe inside a word
    splits it ("o'clock" -> "o clock"), and PTB's list of abbreviations that keep their period ("Mr.")
    is not reproduced ("mr. smith" -> "mr smith"). Both then drop the same punctuation tokens
    (pycocoevalcap's PUNCTUATIONS list).
    """
    punctuation = set(_ptb_punctuation())
    out = []
    for caption in captions:
        text = caption.replace("\n", " ").lower().replace('"', " ")
        for bracket, token in _BRACKETS.items():
            text = text.replace(bracket, token)
        out.append(" ".join(t for t in _PYTHON_TOKEN.findall(text) if t not in punctuation))
    return out


def tokenize(captions: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """Return (tokenised captions, the tokenizer that ran): PTB via java when available, else the fallback."""
    if tokenizer not in TOKENIZERS:
        raise InputError(f"tokenizer: expected one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "ptb-java" and not java_available():
        raise InputError("tokenizer ptb-java needs `java` on PATH (make install sets it up as root)")
    if tokenizer == "ptb-java" or (tokenizer == "auto" and java_available()):
        return ptb_tokenize(captions), "ptb-java"
    return python_tokenize(captions), "python-fallback"


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "auto"
) -> tuple[dict[str, float | str], list[float]]:
    """Return ({"bleu_1".."bleu_4", "cider", "tokenizer"}, per-caption CIDEr-D) over a set of captions.

    BLEU is corpus-level (pycocoevalcap's Bleu(4), verbose off), CIDEr-D the mean of per-caption scores.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references) or not predictions:
        raise InputError(
            f"expected one caption per reference set, got {len(predictions)} for {len(references)}"
        )
    flat = [r for refs in references for r in refs]
    tokens, used = tokenize([*predictions, *flat], tokenizer)
    hypotheses, tokenised_refs = tokens[: len(predictions)], iter(tokens[len(predictions) :])
    gts = {str(i): [next(tokenised_refs) for _ in refs] for i, refs in enumerate(references)}
    res = {str(i): [h] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_caption = Cider().compute_score(gts, res)
    summary: dict[str, float | str] = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    summary.update(cider=float(cider), tokenizer=used)
    return summary, [float(c) for c in per_caption]


def caption_metric(
    predictions: list[str], samples: list[Sample], tokenizer: str = "auto"
) -> tuple[dict[str, float | str], list[float]]:
    """Return BLEU-1..4, CIDEr-D ("cider_<type>": mean per-caption CIDEr-D) and CHAIR; per sample CIDEr-D.

    References are `sample.answers`. CHAIR_i / CHAIR_s are added over the samples whose meta has "objects"
    (shapes-world names), or "coco_objects" (COCO category names: `chair_coco`, with "chair_recall").
    """
    if len(predictions) != len(samples) or not samples:
        raise InputError(f"expected one prediction per sample, got {len(predictions)} for {len(samples)}")
    for s in samples:
        if isinstance(s.answers, str) or not s.answers:
            raise InputError(
                f"sample {s.id}: expected a non-empty list of reference captions, got {s.answers!r}"
            )
    summary, per_caption = caption_scores(predictions, [s.answers for s in samples], tokenizer)
    for t in sorted({str(s.type) for s in samples if s.type}):
        of_type = [c for c, s in zip(per_caption, samples, strict=True) if str(s.type) == t]
        summary[f"cider_{t}"] = sum(of_type) / len(of_type)
    with_objects = [(p, s) for p, s in zip(predictions, samples, strict=True) if "objects" in s.meta]
    if with_objects:
        summary.update(
            chair_scores(
                [p for p, _ in with_objects],
                [s.meta["objects"] for _, s in with_objects],
                [s.id for _, s in with_objects],
            )
        )
    with_coco = [(p, s) for p, s in zip(predictions, samples, strict=True) if "coco_objects" in s.meta]
    if with_coco:
        coco = coco_chair_scores([p for p, _ in with_coco], [s.meta["coco_objects"] for _, s in with_coco])
        summary.update(chair_i=coco["chair_i"], chair_s=coco["chair_s"], chair_recall=coco["recall"])
    summary["primary"] = "cider"
    return summary, per_caption
