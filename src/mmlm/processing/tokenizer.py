"""Text tokenisers that give the same ids as a Hugging Face CLIP or SigLIP checkpoint's own tokenizer.

transformers is not imported: a checkpoint's tokenizer.json runs through the `tokenizers` library, and
SigLIP's spiece.model through `sentencepiece`, with SiglipTokenizer's canonicalisation redone here.
Both pad on the right (or as tokenizer_config.json's padding_side says) and, on truncation, keep the
end-of-text token in the last slot, as the checkpoints' processors do.
"""

import os
import re
import shutil
import string
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import sentencepiece
import torch
from tokenizers import Tokenizer

from mmlm.errors import InputError
from mmlm.json_files import read_json
from mmlm.processing.padding import pad_rows

Padding = Literal["longest", "max_length"]
PADDINGS = ("longest", "max_length")

# Files next to the vocabulary that transformers reads back; save() copies whichever the source had.
_CONFIG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
SPIECE_UNDERLINE = "▁"


@runtime_checkable
class TextTokenizer(Protocol):
    """Turns a batch of texts into a [B, L] LongTensor of token ids, L <= context_length."""

    context_length: int
    pad_id: int
    eos_id: int
    vocab_size: int

    def __call__(self, texts: list[str]) -> torch.Tensor: ...

    def save(self, directory: str | os.PathLike) -> Path: ...


def _read_tokenizer_config(model_dir: Path) -> dict:
    # transformers 5 reads tokenizer_config.json; special_tokens_map.json overrides its special tokens
    # only when the config has no added_tokens_decoder (the legacy layout).
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    map_path = model_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and map_path.is_file():
        config.update({k: v for k, v in read_json(map_path).items() if k in _SPECIAL_KEYS})
    for key in _SPECIAL_KEYS:
        if isinstance(config.get(key), dict):  # older saves write {"content": ..., "__type": "AddedToken"}
            config[key] = config[key]["content"]
    return config


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str) or not isinstance(texts, list | tuple):
        raise InputError(f"texts: expected a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InputError("texts: expected at least one text, got an empty list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}]: expected a string, got {type(text).__name__}")


def _context_length(context_length: int | None, config: dict, model_dir: Path) -> int:
    if context_length is None:
        context_length = config.get("model_max_length")
        # transformers writes 1e30 for "no limit"
        if not isinstance(context_length, int) or context_length > 100_000:
            raise InputError(
                f"{model_dir}: tokenizer_config.json gives no model_max_length; pass context_length"
            )
    if context_length < 2:
        raise InputError(
            f"context_length: expected at least 2 (room for the end token), got {context_length}"
        )
    return context_length


def _check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise InputError(f"padding: expected one of {PADDINGS}, got {padding!r}")


def _copy_config_files(source: Path, target: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (source / name).is_file() and (source / name).resolve() != (target / name).resolve():
            shutil.copyfile(source / name, target / name)


class HFTokenizer:
    """A checkpoint's tokenizer.json run by `tokenizers`; returns [B, L] ids like CLIPProcessor's."""

    def __init__(
        self, model_dir: str | os.PathLike, context_length: int | None = None, padding: Padding = "longest"
    ):
        self.model_dir = Path(model_dir)
        _check_padding(padding)
        self.padding = padding
        path = self.model_dir / "tokenizer.json"
        try:
            self._tokenizer = Tokenizer.from_file(str(path))  # kept unchanged for save()
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise InputError(f"{path}: expected a tokenizers JSON file ({error})") from error
        config = _read_tokenizer_config(self.model_dir)
        self.context_length = _context_length(context_length, config, self.model_dir)
        self.padding_side = config.get("padding_side", "right")

        # A copy does the encoding: truncation there counts the special tokens the post-processor adds,
        # so an over-long caption becomes [bos, text[: L - 2], eos], as transformers' fast tokenizer does.
        self._encoder = Tokenizer.from_str(self._tokenizer.to_str())
        self._encoder.no_padding()
        self._encoder.enable_truncation(max_length=self.context_length)

        # Without a config, fall back to the specials the post-processor wraps an empty text in.
        empty = self._tokenizer.encode("")
        wrapped = [i for i, special in zip(empty.ids, empty.special_tokens_mask, strict=True) if special]
        self.eos_id = self._token_id(config.get("eos_token"), path, fallback=wrapped[-1] if wrapped else None)
        self.bos_id = self._token_id(
            config.get("bos_token"), path, fallback=wrapped[0] if len(wrapped) > 1 else None
        )
        self.pad_id = self._token_id(config.get("pad_token"), path, fallback=self.eos_id)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str | None, path: Path, fallback: int | None) -> int | None:
        if token is None:
            return fallback
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise InputError(
                f"{path}: special token {token!r} named in the tokenizer config is not in the vocabulary"
            )
        return token_id

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Returns token ids [B, L], padded with pad_id to the longest text or to context_length."""
        _check_texts(texts)
        rows = [encoding.ids for encoding in self._encoder.encode_batch(list(texts), add_special_tokens=True)]
        length = self.context_length if self.padding == "max_length" else max(map(len, rows))
        return pad_rows(rows, self.pad_id, self.padding_side, length)

    def save(self, directory: str | os.PathLike) -> Path:
        """Returns the folder after writing tokenizer.json and copying the source's config files into it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        _copy_config_files(self.model_dir, directory, _CONFIG_FILES)
        return directory


class SentencePieceTokenizer:
    """SigLIP's spiece.model with transformers' SiglipTokenizer rules; returns [B, L] ids.

    Per text, as SiglipTokenizer.tokenize does: prefix "▁", split out the special tokens, canonicalise
    each remaining chunk (big_vision's prompt_engineering: lower case, drop ASCII punctuation, squeeze
    whitespace, strip), encode "<unk>" + chunk and drop the pieces of "<unk>", then truncate to
    L - 1 ids and append </s>.
    """

    def __init__(
        self, model_dir: str | os.PathLike, context_length: int | None = None, padding: Padding = "max_length"
    ):
        self.model_dir = Path(model_dir)
        _check_padding(padding)
        self.padding = padding
        path = self.model_dir / "spiece.model"
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise InputError(f"{path}: expected a SentencePiece model ({error})") from error
        config = _read_tokenizer_config(self.model_dir)
        if config.get("legacy", True) is False:
            # legacy=False makes transformers strip the model's dummy prefix, which needs protobuf.
            raise InputError(f"{self.model_dir / 'tokenizer_config.json'}: legacy=false is not supported")
        self.context_length = _context_length(
            context_length, {"model_max_length": 64, **config}, self.model_dir
        )
        self.padding_side = config.get("padding_side", "right")
        self.do_lower_case = bool(config.get("do_lower_case", True))

        # SiglipTokenizer's defaults: eos and pad are both "</s>".
        self._unk_token = config.get("unk_token") or "<unk>"
        names = {
            key: config.get(key) or default for key, default in [("eos_token", "</s>"), ("pad_token", "</s>")]
        }
        self._special_ids = {
            token: self._piece_id(token, path)
            for token in (names["eos_token"], names["pad_token"], self._unk_token)
        }
        self.eos_id = self._special_ids[names["eos_token"]]
        self.pad_id = self._special_ids[names["pad_token"]]
        self.bos_id = None
        self.vocab_size = self._sp.get_piece_size()
        by_length = sorted(self._special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        self._unk_length = len(self._sp.encode(self._unk_token, out_type=str))

    def _piece_id(self, piece: str, path: Path) -> int:
        piece_id = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(piece_id) != piece:
            raise InputError(f"{path}: special token {piece!r} is not a piece of the model")
        return piece_id

    def canonicalize(self, text: str) -> str:
        """Returns text as SigLIP was trained on it: lower-cased, ASCII punctuation removed, spaces squeezed."""
        if self.do_lower_case:
            text = text.lower()
        text = text.translate(str.maketrans("", "", string.punctuation))
        return re.sub(r"\s+", " ", text).strip()

    def _chunk_pieces(self, chunk: str) -> list[str]:
        # With the dummy prefix on, "▁" at the start of a chunk would be dropped; encoding after "<unk>"
        # keeps it, and the pieces of "<unk>" are then cut off again.
        pieces = self._sp.encode(self._unk_token + self.canonicalize(chunk), out_type=str)
        return pieces[self._unk_length :] if len(pieces) >= self._unk_length else pieces

    def pieces(self, text: str) -> list[str]:
        """Returns the SentencePiece pieces of one text, before </s> is appended."""
        # Odd positions hold the special tokens. transformers also strips the whitespace beside them
        # (lstrip/rstrip=True); canonicalize() strips every chunk, so that is not repeated here.
        chunks = self._special_split.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        pieces: list[str] = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._chunk_pieces(chunk))
        # Kept from SiglipTokenizer.tokenize; a model that removes extra whitespace (SigLIP's does)
        # never leaves a lone "▁" here, so no test reaches this line.
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self._special_ids:
            pieces = pieces[1:]
        return pieces

    def encode(self, text: str) -> list[int]:
        """Returns the ids of one text, truncated to context_length and ending in </s>."""
        ids = [self._special_ids.get(p, self._sp.piece_to_id(p)) for p in self.pieces(text)]
        ids = ids[: self.context_length - 1]
        if not ids or ids[-1] != self.eos_id:  # SiglipTokenizer does not add a second </s>
            ids.append(self.eos_id)
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Returns token ids [B, L], padded with pad_id to context_length (or to the longest text)."""
        _check_texts(texts)
        rows = [self.encode(text) for text in texts]
        length = self.context_length if self.padding == "max_length" else max(map(len, rows))
        return pad_rows(rows, self.pad_id, self.padding_side, length)

    def save(self, directory: str | os.PathLike) -> Path:
        """Returns the folder after copying spiece.model and the source's config files into it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _copy_config_files(self.model_dir, directory, ("spiece.model", *_CONFIG_FILES))
        return directory


def load_tokenizer(
    model_dir: str | os.PathLike, context_length: int | None = None, padding: Padding | None = None
) -> TextTokenizer:
    """Returns the tokenizer a checkpoint folder ships: HFTokenizer for tokenizer.json, else SentencePieceTokenizer.

    context_length defaults to tokenizer_config.json's model_max_length; padding defaults to "longest"
    for tokenizer.json (CLIP pools at EOS under a causal mask, so padding does not change it) and
    "max_length" for spiece.model (SigLIP was trained on texts padded to 64).
    """
    model_dir = Path(model_dir)
    has_json = (model_dir / "tokenizer.json").is_file()
    has_spiece = (model_dir / "spiece.model").is_file()
    if has_spiece and has_json:
        # AutoTokenizer builds SiglipTokenizer from spiece.model even when a tokenizer.json is present.
        has_json = _read_tokenizer_config(model_dir).get("tokenizer_class") != "SiglipTokenizer"
    if has_json:
        return HFTokenizer(model_dir, context_length, padding or "longest")
    if has_spiece:
        return SentencePieceTokenizer(model_dir, context_length, padding or "max_length")
    raise InputError(f"{model_dir}: expected a tokenizer.json or spiece.model in this folder, found neither")
