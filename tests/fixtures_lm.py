"""Tiny random transformers Llama, Mistral and Qwen2 folders with a byte-level BPE tokenizer, built offline.

The folders hold what a Hugging Face checkpoint ships (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json), so the code under test loads them as it would a downloaded checkpoint.
"""

import json
from functools import cache
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fixtures_text import caption_corpus

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2, as Llama's config defaults expect
# Characters of several UTF-8 lengths, so some decode only after 2-4 byte tokens (streaming must wait for them)
UNICODE_LINES = ["café naïve façade", "日本語のテキスト", "emoji 🙂 and ✓ marks", "Grüße aus Köln"]
CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}
CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
}


@cache
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus()[::20] + UNICODE_LINES * 5, trainer)
    # Llama's tokenizers put <s> before every text and nothing after it.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return tok.to_str()


def write_lm_tokenizer(folder: Path, vocab_size: int = 384, model_max_length: int = 128) -> int:
    """Write tokenizer.json + tokenizer_config.json of a byte-level BPE into `folder`; return the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_tokenizer_json(vocab_size))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "model_max_length": model_max_length}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return Tokenizer.from_str(_tokenizer_json(vocab_size)).get_vocab_size()


def tiny_lm_config(
    model_type: str = "llama", vocab_size: int = 384, **overrides
) -> transformers.PretrainedConfig:
    """Return a transformers config of a 2-layer, 64-wide model of `model_type` (GQA: 4 heads, 2 KV heads)."""
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    return CONFIGS[model_type](**{**base, **overrides})


def tiny_lm(model_type: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Return a random transformers causal LM, in eval mode, with weights large enough for clear argmaxes."""
    torch.manual_seed(seed)
    # Default init (std 0.02) gives nearly flat logits, where float noise could flip a greedy choice.
    cfg = tiny_lm_config(model_type, initializer_range=0.15, **overrides)
    model = CLASSES[model_type](cfg).eval()
    if model_type == "qwen2" or getattr(cfg, "attention_bias", False):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)  # transformers initialises biases at zero, which would test nothing
    return model


def write_tiny_lm(
    folder: Path, model_type: str = "llama", seed: int = 0, **overrides
) -> transformers.PreTrainedModel:
    """Write a complete tiny checkpoint folder (weights, config, tokenizer) and return the transformers model."""
    vocab = write_lm_tokenizer(folder)
    model = tiny_lm(model_type, seed, vocab_size=vocab, **overrides)
    model.save_pretrained(folder)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Run a test single-threaded: tiny models gain nothing from a second thread, whose synchronisation
    stalls for whole scheduler time slices when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
