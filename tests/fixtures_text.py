"""Tiny, deterministic CLIP and SigLIP tokenizer folders, built offline in a test's tmp_path.

Both builders write the same files a Hugging Face checkpoint ships, so code under test loads them
exactly as it would load a downloaded checkpoint.
"""

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import sentencepiece as spm

# Close to CLIP's word pattern (openai/CLIP simple_tokenizer.py); it only collects the words
# that the merges are learnt from.
CLIP_WORD = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""")

_SUBJECTS = [
    "a cat",
    "two dogs",
    "the red car",
    "an old man",
    "a small bird",
    "the city",
    "my friend",
    "a yellow taxi",
    "four horses",
    "the chef",
    "a quiet kitchen",
    "zebras",
    "a jazz quartet",
    "the mountain village",
]
_VERBS = [
    "sitting on",
    "running through",
    "looking at",
    "parked near",
    "flying over",
    "painted with",
    "jumping across",
    "cooking beside",
    "hidden behind",
    "playing quickly under",
    "waiting next to",
]
_OBJECTS = [
    "the grass",
    "a wooden table",
    "the blue sky",
    "some flowers",
    "a busy street",
    "the river",
    "frozen lakes",
    "vivid murals",
    "an empty beach",
    "the bright window",
    "heavy boxes",
    "the squeaky gate",
]
_EXTRAS = [
    "at night",
    "in summer",
    "photo",
    "drawing",
    "close-up",
    "3 people",
    "it's sunny",
    "don't move",
    "1998",
    "watercolour",
    "black and white",
    "extremely blurry",
]


def caption_corpus() -> list[str]:
    """Returns a fixed list of ~22,000 short captions used to train both tiny vocabularies."""
    return [f"{s} {v} {o}, {e}." for s, v, o, e in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _EXTRAS)]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return dict(zip(printable + extra, map(chr, chars), strict=True))


def _learn_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
        merged: Counter = Counter()
        for word, count in words.items():
            symbols, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    symbols.append(best[0] + best[1])
                    i += 2
                else:
                    symbols.append(word[i])
                    i += 1
            merged[tuple(symbols)] += count
        words = merged
    return merges


def write_clip_tokenizer(
    directory: Path, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77, num_merges: int = 150
) -> tuple[Path, int]:
    """Returns (folder, vocab size) of a CLIP byte-level BPE tokenizer saved by transformers' CLIPTokenizer.

    The vocabulary is laid out like openai's: 256 byte symbols, the same with "</w>", the merges,
    then <|startoftext|> and <|endoftext|>. pad_token="!" gives the id-0 padding some checkpoints use.
    """
    from transformers import CLIPTokenizer

    byte_to_char = _bytes_to_unicode()
    words: Counter = Counter()
    for caption in caption_corpus():
        for word in CLIP_WORD.findall(caption.lower()):
            chars = [byte_to_char[b] for b in word.encode("utf-8")]
            words[(*chars[:-1], chars[-1] + "</w>")] += 1
    merges = _learn_merges(words, num_merges)

    alphabet = list(byte_to_char.values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory, len(vocab)


def write_siglip_tokenizer(
    directory: Path, *, vocab_size: int = 128, model_max_length: int = 64
) -> tuple[Path, int]:
    """Returns (folder, vocab size) of a SigLIP-style folder: a unigram spiece.model and its configs.

    Ids follow SigLIP's (T5's) SentencePiece model: <pad>=0, </s>=1, <unk>=2, no <bos>; the configs
    are the ones google/siglip-* checkpoints ship (pad and eos both "</s>", lower-casing on).
    """
    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()),
        model_prefix=str(directory / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # multi-threaded training is not reproducible
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (directory / "spiece.vocab").unlink()
    special = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    config = {
        "added_tokens_decoder": {
            str(i): {
                "content": c,
                "lstrip": True,
                "normalized": False,
                "rstrip": True,
                "single_word": False,
                "special": True,
            }
            for i, c in [(1, "</s>"), (2, "<unk>")]
        },
        **special,
        "additional_special_tokens": [],
        "do_lower_case": True,
        "model_input_names": ["input_ids"],
        "model_max_length": model_max_length,
        "processor_class": "SiglipProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "SiglipTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory, vocab_size


def write_siglip2_tokenizer(directory: Path) -> tuple[Path, int]:
    """Returns (folder, vocab size) of a SigLIP 2-style tokenizer.json: Gemma's kind of BPE (spaces as "▁",
    lower-casing, <pad>=0, <eos>=1, <bos>=2), eos appended and no bos, as google/siglip2-* tokenizer_config.json
    says (add_bos_token false, add_eos_token true); padding on the right."""
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "c"), ("o", "f"), ("a", "t"), ("▁c", "at"), ("▁", "o"), ("▁o", "f")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Siglip2Tokenizer(
        vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True, padding_side="right"
    )
    tokenizer.save_pretrained(directory)
    return directory, len(vocab)
