"""Idefics (v1) prompts: the text IdeficsProcessor writes around each image, as VLMProcessor's render step.

IdeficsProcessor takes a list of items, text or image. It starts with the tokenizer's bos as text, strips the
spaces around every text item, writes each image as `<fake_token_around_image><image><fake_token_around_image>`
(an image right after another shares the fake token between them: `...<image><fake_token_around_image>`) and
tokenises the whole without adding special tokens. mmlm's str prompt "User:<image>Describe it." is the item list
["User:", image, "Describe it."]: the text between `<image>` markers, each stripped of spaces, and a segment left
empty is no item, so "<image><image>" is two images in a row. A chat prompt is rendered by its template, then
its `<image>` runs are wrapped the same way (no stripping, the template's spacing is kept).

Each `<image>` stays one token: the model's slot for that image (Flamingo fusion: the image reaches the LM
through the gated cross-attention blocks, and the media mask is built from these `<image>` positions).
"""

import re

from mmlm.processing.vlm_processor import Prompt, VLMProcessor

FAKE_TOKEN = "<fake_token_around_image>"


def wrap_images(text: str, image_token: str) -> tuple[str, list[tuple[int, int]]]:
    """Return `text` with each run of `image_token`s wrapped in fake tokens, and (old position, chars added
    before it) at each run's end, for moving character spans."""
    pieces, shifts, last, added = [], [], 0, 0
    for run in re.finditer(f"(?:{re.escape(image_token)})+", text):
        count = (run.end() - run.start()) // len(image_token)
        pieces += [text[last : run.start()], FAKE_TOKEN + (image_token + FAKE_TOKEN) * count]
        added += (count + 1) * len(FAKE_TOKEN)
        shifts.append((run.end(), added))
        last = run.end()
    return "".join(pieces) + text[last:], shifts


def _moved(position: int, offset: int, shifts: list[tuple[int, int]]) -> int:
    # spans never start inside an image run, so the shift of the last run ending at or before it applies
    return offset + position + max([added for end, added in shifts if end <= position], default=0)


def idefics_prompt_text(prompt: str, image_token: str, bos_token: str | None) -> str:
    """Return the text IdeficsProcessor writes for the items of a str prompt (see the module docstring)."""
    segments = [segment.strip(" ") for segment in prompt.split(image_token)]
    text = bos_token or ""
    for i, segment in enumerate(segments):
        if i:  # an image stood before this segment
            after_image = text.endswith(image_token + FAKE_TOKEN)
            text += (image_token if after_image else FAKE_TOKEN + image_token) + FAKE_TOKEN
        text += segment
    return text


class IdeficsProcessor(VLMProcessor):
    """VLMProcessor whose prompts are written as transformers' IdeficsProcessor writes them."""

    def render(
        self, prompt: Prompt, answer: str | None = None, add_generation_prompt: bool = False
    ) -> tuple[str, tuple[tuple[int, int], ...]]:
        """Return the prompt's Idefics text and its answers' character spans."""
        if isinstance(prompt, str):
            text = idefics_prompt_text(prompt, self.image_token, self.bos_token)
            if answer is None:
                return text, ()
            return text + answer + (self.eos_token or ""), (
                (len(text), len(text) + len(answer) + len(self.eos_token or "")),
            )
        rendered, spans = super().render(prompt, answer, add_generation_prompt)
        text, shifts = wrap_images(rendered, self.image_token)
        return text, tuple((_moved(start, 0, shifts), _moved(end, 0, shifts)) for start, end in spans)
