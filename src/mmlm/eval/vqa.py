"""VQA answer normalisation and accuracy, as the official VQA v2 evaluation (vqaEval.py, Antol et al. 2015).

Normalisation of an answer, in the official order:
  1. newlines and tabs become spaces; the ends are stripped.
  2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted if it is written next to a
     space anywhere in the answer (or if the answer holds a comma between digits, "1,000"), else it becomes a
     space ("t-shirt" -> "t shirt"). The checks look at the answer as given, not as it is being rewritten.
  3. a period not followed by a digit is deleted ("3.5" keeps its point); as in the official code, at most
     32 of them (it passes re.UNICODE, 32, where `re.sub` takes its count).
  4. lower case; words split on whitespace; number words "none", "zero".."ten" become digits; the articles
     "a", "an", "the" are dropped; the contractions table restores apostrophes ("dont" -> "don't").

Accuracy (VQA v2): an answer is correct if at least 3 of the 10 humans gave it, averaged over the 10 subsets
of 9 humans: acc = 1/10 Σ_i min(1, #{j ≠ i : answer_j = prediction} / 3). One human agreeing gives 0.3, two 0.6,
three 0.9, four or more 1.0. With a single reference it is always 0: use `exact_match` for one-answer data.
As the official evaluate() (GT-Vision-Lab/VQA, the version LAVIS and MMF ship): the prediction is normalised in
full; the human answers only by step 2 and 3 and only when they are not all the same, as written otherwise.
"""

import re
from collections.abc import Sequence
from typing import Any

from mmlm.errors import InputError

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = ("a", "an", "the")
# The official table, keys as written there: the capitalised ones ("Im", "Ive") are never reached, because
# words are lower-cased before the lookup, and "somebody'd" -> "somebodyd" runs backwards; both kept as is.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
# The official pattern's "(?!<=\d)" is a lookahead, not the lookbehind it looks like: every period that is
# not followed by a digit goes, whatever precedes it ("1.": "1", ".5": ".5").
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
OFFICIAL_PERIOD_LIMIT = 32  # re.UNICODE's value, passed as `count` in the official code


def strip_answer(text: str) -> str:
    """Return the answer with newlines and tabs as spaces and its ends stripped (the official first step)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Return `text` with the official punctuation rules applied (steps 2 and 3 of the module docstring)."""
    out = text
    delete_all = COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=OFFICIAL_PERIOD_LIMIT)


def process_digits_and_articles(text: str) -> str:
    """Return `text` lower-cased with number words as digits, articles dropped and contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """Return the answer normalised as the official VQA evaluation does ("Two dogs." -> "2 dogs")."""
    return process_digits_and_articles(process_punctuation(strip_answer(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], always_normalize: bool = False) -> float:
    """Return the VQA v2 accuracy of one prediction against the human answers (usually 10), in [0, 1].

    As the official evaluate(): the prediction is normalised (`normalize_answer`); the answers get only the
    punctuation step, and only when they are not all the same, so an answer written "Two" or "the cat" never
    matches (docs/parity.md). `always_normalize` normalises the answers in full too, as lmms-eval's vqav2 task.
    """
    if isinstance(answers, str) or not answers:
        raise InputError(f"answers: expected a non-empty list of reference answers, got {answers!r}")
    prediction = normalize_answer(prediction)
    if always_normalize:
        answers = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    matches = [a == prediction for a in answers]
    total = sum(matches)
    # leave human i out: the other answers that match are total − matches[i]
    return sum(min(1.0, (total - hit) / 3) for hit in matches) / len(answers)


def exact_match(prediction: str, answer: str) -> bool:
    """Return True when the prediction equals the (single) reference answer after VQA normalisation of both."""
    return normalize_answer(prediction) == normalize_answer(answer)


def vqa_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], types: Sequence[str] | None = None
) -> dict[str, float]:
    """Return {"accuracy", "accuracy_<type>"...}: exact match where a question has one answer, else VQA accuracy."""
    if len(predictions) != len(references) or (types is not None and len(types) != len(predictions)):
        raise InputError(
            f"predictions, references and types must have one entry per question, got {len(predictions)}, "
            f"{len(references)} and {len(types) if types is not None else len(predictions)}"
        )
    if not predictions:
        raise InputError("predictions: expected at least one question")
    scores = [
        float(exact_match(p, refs[0])) if len(refs) == 1 else vqa_accuracy(p, refs)
        for p, refs in zip(predictions, references, strict=True)
    ]
    out = {"accuracy": sum(scores) / len(scores)}
    for t in sorted(set(types or ())):
        of_type = [s for s, ty in zip(scores, types, strict=True) if ty == t]
        out[f"accuracy_{t}"] = sum(of_type) / len(of_type)
    return out


def question_messages(question: str) -> list[dict[str, str]]:
    """Return the chat messages that ask `question` about one image (as the instruction data is written)."""
    return [{"role": "user", "content": f"<image>\n{question}"}]


def answer_questions(
    model: Any,
    images: Sequence[Any] | None,
    questions: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 48,
) -> list[str]:
    """Return a generative model's greedy answers (KV-cached, batched) to one question about each image, or to
    the questions alone (no image in the prompt) when `images` is None."""
    model.model.eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        if images is None:
            prompts = [[{"role": "user", "content": q}] for q in questions[chunk]]
            answers += model.generate(prompts, None, max_new_tokens=max_new_tokens)
            continue
        prompts = [question_messages(q) for q in questions[chunk]]
        answers += model.generate(prompts, [[im] for im in images[chunk]], max_new_tokens=max_new_tokens)
    return [a.strip() for a in answers]
