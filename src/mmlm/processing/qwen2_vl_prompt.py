"""Qwen2-VL / Qwen2.5-VL prompt expansion: the image tokens one `<|image_pad|>` becomes, given the image's grid.

Qwen's chat template writes each image as `<|vision_start|><|image_pad|><|vision_end|>`; its processor then
repeats `<|image_pad|>` once per merged token, rows · columns / merge_size² times (transformers'
`Qwen2VLProcessor.replace_image_token`), so an image of r × c patches reads
`<|vision_start|>` + `<|image_pad|>` · (r·c/m²) + `<|vision_end|>`.
"""

from dataclasses import dataclass

from tokenizers import Tokenizer

from mmlm.errors import InputError

IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class Qwen2VLPrompt:
    """The expansion of one `<|image_pad|>` into one image token per merged patch block."""

    merge_size: int = 2
    image_token: str = IMAGE_PAD

    def image_tokens(self, grid: tuple[int, int], views: int = 1, tokens_per_view: int = 0) -> int:
        """Return the image tokens of an image of `grid` (rows, columns) patches: rows · columns / merge_size²."""
        rows, cols = grid
        return rows * cols // self.merge_size**2

    def ids(self, tokenizer: Tokenizer, grid: tuple[int, int]) -> list[int]:
        """Return the token ids one image's placeholder becomes."""
        token = tokenizer.token_to_id(self.image_token)
        if token is None:
            raise InputError(f"tokenizer: no {self.image_token} token; expected a Qwen2-VL tokenizer")
        return [token] * self.image_tokens(grid)
