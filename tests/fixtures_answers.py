"""Seeded generators of real-world-shaped short answers, the inputs of the metric parity tests.

Numbers with units, commas, signs and percent signs; number words; articles; punctuation in and around
words; contractions with and without apostrophes; yes/no variants; option letters in varied formats; long
free text; case and whitespace changes. Each generator takes a `random.Random` so a test's cases are fixed.
"""

import random

NUMBER_WORDS = ["none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twenty"]  # fmt: skip
WORDS = ["dog", "cat", "red", "blue", "man", "woman", "frisbee", "t-shirt", "left", "right", "tennis", "pizza",
         "kitchen", "bus", "white and black", "dont", "isnt", "cant", "its", "whats", "im", "Im", "dog's",
         "somebody'd", "yall", "oclock", "o'clock", "nothing", "a", "an", "the", "The", "A"]  # fmt: skip
PUNCTUATION = list(";/[]\"{}()=+\\_-><@`,?!.:'%$#&*")
UNITS = ["", "", "%", " %", " kg", "cm", " years", " million", "$", " USD", "k"]
YES_NO = ["yes", "no", "Yes", "No", "YES", "NO", "yes.", "No.", "Yes, there is.", "No, there is not.",
          "no!", "Nope", "yeah", "There is no dog.", "I do not see one.", "Not really", "No\nthere is", "",
          "Yes there is a dog, not a cat.", "nothing", "None.", "Yes.No."]  # fmt: skip


def number(rng: random.Random) -> str:
    """Return a number as people and models write it: "3", "1,250", "-0.5", ".75", "12.0", "1,000,000"."""
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randint(0, 20))
    if kind == 1:
        return f"{rng.randint(1000, 9_999_999):,}"
    if kind == 2:
        return f"{rng.uniform(-100, 100):.{rng.randint(1, 3)}f}"
    if kind == 3:
        return "." + str(rng.randint(1, 99))
    if kind == 4:
        return str(rng.randint(0, 3000)) + rng.choice([".0", ".", ",", ",,", ""])
    return rng.choice(["1,,000", "3,5", "10,000.5", "1e3", "0", "0.0", "-0", "nan", "inf"])


def short_answer(rng: random.Random) -> str:
    """Return one VQA-style answer: words, numbers with units, punctuation, case and whitespace variants."""
    parts = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 6])):
        kind = rng.randrange(5)
        if kind == 0:
            parts.append(number(rng) + rng.choice(UNITS))
        elif kind == 1:
            parts.append(rng.choice(NUMBER_WORDS))
        else:
            parts.append(rng.choice(WORDS))
    text = rng.choice([" ", " ", ", ", "-", " - ", "/", " and "]).join(parts)
    for _ in range(rng.choice([0, 0, 1, 2])):
        i = rng.randint(0, len(text))
        mark = rng.choice(PUNCTUATION)
        text = text[:i] + rng.choice([mark, mark + " ", " " + mark]) + text[i:]
    if rng.random() < 0.2:
        text = text.upper() if rng.random() < 0.5 else text.title()
    if rng.random() < 0.15:
        text = rng.choice([" ", "\n", "\t"]) + text + rng.choice(["", ".", "!", " \n", "\t"])
    return text


def free_text(rng: random.Random) -> str:
    """Return a sentence-long response, as a chatty model answers a short question."""
    lead = rng.choice(["The answer is", "I think it is", "It looks like", "There are", "In the image,", ""])
    return f"{lead} {short_answer(rng)}{rng.choice(['.', '', ' in the picture.', '!'])}".strip()
