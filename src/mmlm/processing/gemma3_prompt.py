"""Gemma 3 prompt expansion: each `<start_of_image>` a prompt writes becomes
`\\n\\n<start_of_image>` + image_seq_length × `<image_soft_token>` + `<end_of_image>\\n\\n`, as Gemma3Processor
writes it (its `full_image_sequence`); the soft tokens are the slots the model fills.

Gemma3Processor expands the text before tokenising it; mmlm tokenises the expansion on its own. The ids agree
wherever the tokenizer does not merge the expansion's blank lines with whitespace written next to the
placeholder.
"""

from dataclasses import dataclass

from tokenizers import Tokenizer

from mmlm.errors import InputError

BOI_TOKEN, EOI_TOKEN, SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


@dataclass(frozen=True)
class Gemma3Prompt:
    """The expansion of one `<start_of_image>` placeholder into the image's slots and their markers."""

    image_seq_length: int
    boi_token: str = BOI_TOKEN
    eoi_token: str = EOI_TOKEN
    slot_token: str = SOFT_TOKEN  # the token the model's slots hold, unlike the placeholder

    def text(self) -> str:
        """Return the text that replaces one placeholder."""
        return f"\n\n{self.boi_token}{self.slot_token * self.image_seq_length}{self.eoi_token}\n\n"

    def image_tokens(self, grid: tuple[int, int], views: int, tokens_per_view: int) -> int:
        """Return the slot tokens the model fills for one image: image_seq_length (one view, no pan-and-scan)."""
        return self.image_seq_length

    def ids(self, tokenizer: Tokenizer, grid: tuple[int, int]) -> list[int]:
        """Return the token ids of one image's expansion; InputError if the tokenizer lacks one of its markers."""
        missing = [
            t for t in (self.boi_token, self.eoi_token, self.slot_token) if tokenizer.token_to_id(t) is None
        ]
        if missing:
            raise InputError(f"tokenizer.json: no {missing[0]} token, which Gemma 3's image prompt needs")
        return tokenizer.encode(self.text(), add_special_tokens=False).ids
