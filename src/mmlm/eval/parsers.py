"""Answer parsers: turn a model's free-form response into the short answer a metric compares.

Each parser is `parse(response, sample) -> str` and is idempotent (parsing a parsed answer returns it), so a
metric may run its own parser again on answers that were parsed already. `PARSERS` names them:

  vqa            strip, then keep the first line (VQA v2, DocVQA, ChartQA short answers).
  yes_no         POPE's official rule (`yes_no`): "yes" unless a negation word is in the first sentence.
  option_letter  the chosen option's letter for multiple choice (`option_letter`), "" when none is found.
  mmmu_option    MMMU's own parse_multi_choice_response (`mmmu_option`), "" where it would pick at random.
  number         the first number in the text (`first_number`), for counting and chart questions.
  caption        strip.
  raw            the response unchanged (ANLS and relaxed accuracy clean the text themselves, as their
                 official scripts do, so any parsing here would change their score).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tasks.py may import the parsers for its task table, so only the type is imported here
    from mmlm.eval.tasks import Sample


def first_line(response: str, sample: Sample | None = None) -> str:
    """Return the response stripped, up to its first line break."""
    text = response.strip()
    return text.split("\n", 1)[0].strip()


def raw_response(response: str, sample: Sample | None = None) -> str:
    """Return the response unchanged."""
    return response


def strip_response(response: str, sample: Sample | None = None) -> str:
    """Return the response with its ends stripped."""
    return response.strip()


# POPE's evaluate.py (Li et al. 2023, github.com/RUCAIBox/POPE, also LLaVA's eval_pope.py): keep the text
# before the first ".", delete commas, split on single spaces, and answer "no" iff one of these words is there.
POPE_NEGATIONS = ("No", "not", "no")


def yes_no(response: str, sample: Sample | None = None) -> str:
    """Return "no" if the first sentence has the word No, not or no (POPE's rule), else "yes".

    As the official code: only single spaces split words, so "No\\nThere is" or "no!" is one word and reads
    "yes"; every answer without a negation, empty ones included, is "yes".
    """
    text = response
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in POPE_NEGATIONS for w in words) else "yes"


# ---- multiple choice ----

LETTERS = string.ascii_uppercase
_EDGE_PUNCTUATION = (
    ",.!?;:'\"*` \n\t"  # MMMU strips , . ! ? ; : ' from both ends; we add quotes, ** and spaces
)
_BARE_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?[.:)]?")
# the keywords in any case, the letter in upper case ("the answer is a cat" states no letter)
_STATED = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|would be|will be|should be)?\s*[:：]?\s*(?i:option|choice)?\s*"
    r"[(\[]?([A-Z])[)\]]?(?![A-Za-z0-9'])"
)
_LEADING = re.compile(r"^[(\[]?([A-Z])(?:[)\]]|[.:)])(?=\s|$)")
_BRACKETED = re.compile(r"\(([A-Z])\)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_OPTION_PREFIX = re.compile(r"^\s*[(\[]?[A-Z][)\].:]\s+")


def _valid_letters(sample: Sample | None) -> str:
    choices = getattr(sample, "choices", None)
    return LETTERS[: len(choices)] if choices else LETTERS


def _normalise_text(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed: the form option texts are matched in."""
    return " ".join(re.sub(r"[^\w%]+", " ", text.lower()).split())


def _option_text_letter(response: str, choices: list[str]) -> str:
    """Return the letter of the option whose text the response mentions last (whole words), or ""."""
    texts = {LETTERS[i]: _normalise_text(_OPTION_PREFIX.sub("", c)) for i, c in enumerate(choices)}
    texts = {letter: t for letter, t in texts.items() if t}
    if not texts:
        return ""
    # longest first, so "dark red" wins over the "red" inside it; matches do not overlap
    ordered = sorted(texts.items(), key=lambda kv: -len(kv[1]))
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for _, t in ordered) + r")(?!\w)")
    found = [m.group(1) for m in pattern.finditer(_normalise_text(response))]
    if not found:
        return ""
    by_text = {t: letter for letter, t in reversed(ordered)}
    return by_text[found[-1]]


def option_letter(response: str, sample: Sample | None = None) -> str:
    """Return the letter (A, B, ...) of the option the response chooses, or "" when it names none.

    The rule, first that applies (MMMU's parse_multi_choice_response and lmms-eval's MMStar/MMBench
    parsers, made deterministic: where MMMU picks a random letter we return ""). Valid letters are the
    first len(sample.choices) ("A".."Z" without choices); a letter in running text must be upper case.
      1. the whole response is a letter: "B", "b", "(B)", "[B]", "B.", "B)", "B:";
      2. a stated answer: "Answer: B", "The answer is (B)", "answer is option C", "Choice: D" — the last one;
      3. a leading label: "B. blue square", "(C) three", "D: yes";
      4. a bracketed letter anywhere, "(B)" — the last one (MMMU's first candidates);
      5. a standalone capital letter, "I pick B" — the last one, skipping an "A" used as an article
         ("A red circle") and "I" used as a pronoun (followed by a lower-case word);
      6. the text of an option, matched lower-cased, without punctuation, as whole words — the option
         mentioned last (MMMU's content match, which it only tries past 5 words; we always do).
    """
    valid = _valid_letters(sample)
    text = response.strip().strip(_EDGE_PUNCTUATION)
    bare = _BARE_LETTER.fullmatch(text)
    if bare and bare.group(1).upper() in valid:
        return bare.group(1).upper()
    stated = [m.group(1) for m in _STATED.finditer(text) if m.group(1) in valid]
    if stated:
        return stated[-1]
    leading = _LEADING.match(text)
    if leading and leading.group(1) in valid:
        return leading.group(1)
    bracketed = [m.group(1) for m in _BRACKETED.finditer(text) if m.group(1) in valid]
    if bracketed:
        return bracketed[-1]
    standalone = [
        m.group(1)
        for m in _STANDALONE.finditer(text)
        if m.group(1) in valid
        and not (m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end() :]))  # article / pronoun
    ]
    if standalone:
        return standalone[-1]
    choices = getattr(sample, "choices", None)
    return _option_text_letter(text, choices) if choices else ""


# MMMU's parse_multi_choice_response (github.com/MMMU-Benchmark/MMMU, as lmms-eval's mmmu task): the marks it
# strips from both ends, one after another
MMMU_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")


def _mmmu_candidates(response: str, letters: str, index2ans: dict[str, str]) -> tuple[list[str], str]:
    """Return MMMU's candidate letters and how they were found: "bracket", "letter" or "text"."""
    found = [c for c in letters if f"({c})" in response]
    if found:
        return found, "bracket"
    found = [c for c in letters if f"{c} " in response] or [c for c in letters if f"{c}." in response]
    if found:
        return found, "letter"
    if len(response.split()) > 5:
        return [c for c, text in index2ans.items() if text.lower() in response.lower()], "text"
    return [], "letter"


def mmmu_option(response: str, sample: Sample | None = None) -> str:
    """Return the letter MMMU's parse_multi_choice_response picks, or "" where it would pick one at random.

    In order: "(B)" anywhere; "B " or "B." anywhere (case-sensitive, so "A cat" reads A); past 5 words, an
    option's text. Of several candidates the one written last wins. Deliberate deviation: with no
    candidate MMMU draws a random letter, we return "" (scored wrong), so a score does not depend on a seed.
    """
    choices = list(getattr(sample, "choices", None) or [])
    letters = LETTERS[: len(choices)] if choices else LETTERS
    index2ans = dict(zip(letters, choices, strict=False))
    for mark in MMMU_EDGE_MARKS:
        response = response.strip(mark)
    response = f" {response} "
    candidates, how = _mmmu_candidates(response, letters, index2ans)
    if not candidates:
        return ""
    if how == "bracket":
        positions = [response.rfind(f"({c})") for c in candidates]
    elif how == "letter":
        positions = [response.rfind(f" {c} ") for c in candidates]
    else:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[positions.index(max(positions))]  # the first of equal maxima, as np.argmax


# ---- numbers ----

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                 "nineteen", "twenty")  # fmt: skip
_NUMBER = re.compile(
    r"(?<![\w.])(-)?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)(?![\d])"
    r"|\b(" + "|".join(_NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)


def first_number(response: str, sample: Sample | None = None) -> str:
    """Return the first number in the response as digits ("There are three." -> "3"), or "" when none.

    Thousands separators go ("1,250" -> "1250"), a sign directly before the digits stays ("-3.5"), a
    following "%" or unit is dropped ("45%" -> "45"); number words zero..twenty count as numbers.
    """
    match = _NUMBER.search(response)
    if match is None:
        return ""
    if match.group(3) is not None:
        return str(_NUMBER_WORDS.index(match.group(3).lower()))
    return (match.group(1) or "") + match.group(2).replace(",", "")


PARSERS: dict[str, Callable[[str, Sample], str]] = {
    "vqa": first_line,
    "yes_no": yes_no,
    "option_letter": option_letter,
    "mmmu_option": mmmu_option,
    "number": first_number,
    "caption": strip_response,
    "raw": raw_response,
}
