"""MMMU's open-question scoring (Yue et al. 2024; its eval_utils.py, which lmms-eval's mmmu task runs); a
multiple-choice question scores the letter `parsers.mmmu_option` picks (metrics.mmmu_metric does both).

An open response is read as MMMU reads it: lower-cased, cut into lines (its sentence split looks for a capital
after ". ", which never follows lower-casing, so only line breaks cut), and from each line the shortest tail after
a key phrase ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", and "=" on the
last line); with no key phrase anywhere, the whole response. Every number in those tails joins them. Each candidate
is normalised: a number becomes a float rounded to 2 decimals, a text is lower-cased, a one-character text becomes
" x" and "x " so that it cannot match inside a word. A response is right when a float candidate equals a
normalised reference number, or a normalised reference text lies inside a text candidate.
"""

import re
from collections.abc import Sequence

KEY_PHRASES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL_TAILS = (":", ",", ".", "!", "?", ";", "'")
# MMMU's extract_numbers: numbers with thousands commas, in scientific notation, and plain ones (each list apart,
# so a number may appear in more than one)
NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),
)

Candidate = str | float


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalise(text: str) -> list[Candidate]:
    """Return MMMU's normal form of one answer or candidate: [a float rounded to 2 decimals], [lower-cased text],
    or, for one character, [" x", "x "]."""
    text = text.strip()
    number = _as_number(text)
    if number is not None:
        return [round(number, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def key_tails(response: str) -> list[str]:
    """Return, per line of the lower-cased response, the shortest text after a key phrase; the whole response
    when no line has one."""
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    tails = []
    for index, line in enumerate(lines):
        phrases = KEY_PHRASES + (("=",) if index == len(lines) - 1 else ())
        shortest = ""
        for phrase in phrases:
            if phrase in line:
                tail = line.split(phrase)[-1].strip()
                # as MMMU: an empty tail counts as none found yet, so a later, longer tail replaces it
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in TRIVIAL_TAILS:
            tails.append(shortest)
    return tails or [response]


def open_candidates(response: str) -> list[Candidate]:
    """Return the normalised candidates MMMU's parse_open_response finds in an open response (as a set, sorted)."""
    tails = key_tails(response)
    texts = tails + [
        number for tail in tails for pattern in NUMBER_PATTERNS for number in pattern.findall(tail)
    ]
    found = {candidate for text in texts for candidate in normalise(text)}
    return sorted(found, key=lambda c: (isinstance(c, str), str(c)))


def open_answer_correct(response: str, answers: Sequence[str]) -> bool:
    """Return whether MMMU's eval_open accepts the response for the reference answers."""
    references = [r for answer in answers for r in normalise(answer)]
    for candidate in open_candidates(response):
        if isinstance(candidate, str):
            if any(isinstance(r, str) and r in candidate for r in references):
                return True
        elif candidate in references:
            return True
    return False
