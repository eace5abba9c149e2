"""Chameleon prompt expansion: one `<image>` becomes begin-of-image, image_seq_length `<image>` slots, end-of-image.

transformers' `ChameleonProcessor.replace_image_token` writes `<racm3:break>` + `<image>` · image_seq_length +
`<eoss>` for every image (the VQ-GAN's code grid, 1024 = 32 × 32 codes for the released 512-px models); the model
then overwrites the slots with the image's code tokens. The processor also appends the tokenizer's separator
(`<reserved08706>`) to every prompt in chat mode; VLMProcessor's `prompt_suffix` does that part.
"""

from dataclasses import dataclass

from tokenizers import Tokenizer

from mmlm.errors import InputError

BEGIN_IMAGE, END_IMAGE = "<racm3:break>", "<eoss>"


@dataclass(frozen=True)
class ChameleonPrompt:
    """The expansion of one `<image>` into its code-token slots between the begin- and end-of-image markers."""

    image_seq_length: int
    image_token: str = "<image>"
    begin_image: str = BEGIN_IMAGE
    end_image: str = END_IMAGE

    def image_tokens(self, grid: tuple[int, int], views: int = 1, tokens_per_view: int = 0) -> int:
        """Return the slots one image fills: image_seq_length, whatever its size (it is resized to one grid)."""
        return self.image_seq_length

    def ids(self, tokenizer: Tokenizer, grid: tuple[int, int]) -> list[int]:
        """Return the token ids one image's placeholder becomes."""
        markers = [tokenizer.token_to_id(t) for t in (self.begin_image, self.image_token, self.end_image)]
        if None in markers:
            missing = (self.begin_image, self.image_token, self.end_image)[markers.index(None)]
            raise InputError(f"tokenizer: no {missing} token; expected a Chameleon tokenizer")
        begin, image, end = markers
        return [begin, *[image] * self.image_seq_length, end]
