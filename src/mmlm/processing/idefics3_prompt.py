"""Idefics3 / SmolVLM prompt expansion: the text one `<image>` becomes, given how the image was split.

Each tile is `<fake_token_around_image><row_r_col_c>` then image_seq_len `<image>` tokens, a newline after each
row of tiles, then a blank line and the global view as `<fake_token_around_image><global-img>` + image_seq_len
`<image>` + `<fake_token_around_image>`. An image that was not split is the global view alone. Idefics3Processor
and SmolVLMProcessor write the same text for images (SmolVLM reads the token strings from its tokenizer, with
these defaults, and adds timestamps only for video frames).
"""

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from mmlm.errors import InputError

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


@dataclass(frozen=True)
class Idefics3Prompt:
    """The expansion of one `<image>` into its tiles' row/column markers and image tokens."""

    image_seq_len: int
    image_token: str = "<image>"

    def text(self, rows: int, cols: int) -> str:
        """Return the text that replaces one `<image>` split into rows × cols tiles ((0, 0): not split)."""
        images = self.image_token * self.image_seq_len
        global_view = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{images}{FAKE_TOKEN}"
        if rows == 0 and cols == 0:
            return global_view
        tiles = "".join(
            "".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{images}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return f"{tiles}\n{global_view}"

    def markers(self, rows: int, cols: int) -> Sequence[str]:
        """Return the special tokens the expansion of a rows × cols split uses."""
        tiles = [f"<row_{r + 1}_col_{c + 1}>" for r in range(rows) for c in range(cols)]
        return [FAKE_TOKEN, GLOBAL_TOKEN, self.image_token, *tiles]

    def ids(self, tokenizer: Tokenizer, grid: tuple[int, int]) -> list[int]:
        """Return the token ids of one image's expansion; InputError if the tokenizer lacks one of its markers."""
        missing = [m for m in self.markers(*grid) if tokenizer.token_to_id(m) is None]
        if missing:
            rows, cols = grid
            raise InputError(
                f"image: split into {rows}x{cols} tiles, but the tokenizer has no {missing[0]} token; "
                "use a smaller size.longest_edge or an image of another aspect ratio"
            )
        # segments between the special tokens tokenize alone, so the ids equal those of the expanded prompt
        return tokenizer.encode(self.text(*grid), add_special_tokens=False).ids
