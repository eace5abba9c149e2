"""Train a byte-level BPE tokenizer on a caption corpus (for from-scratch models) with `tokenizers`."""

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


def train_bpe(
    texts: Iterable[str],
    folder: Path,
    vocab_size: int = 1024,
    context_length: int = 32,
    template: str = f"{BOS} $A {EOS}",
) -> Path:
    """Write tokenizer.json + tokenizer_config.json (lower-cased byte-level BPE, each text framed as `template`
    says); return folder."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[
            PAD,
            EOS,
            BOS,
        ],  # ids 0, 1, 2: transformers reads eos_token_id == 2 as old-style pooling
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "model_max_length": context_length}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    # every rank of a torchrun job trains the same tokenizer into the same folder: each file appears whole
    # (written aside, then renamed), so a rank never reads another's half-written file
    write_atomically(folder / "tokenizer.json", tok.to_str(pretty=True))
    write_atomically(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return folder


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a process-private temporary file and one rename."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
