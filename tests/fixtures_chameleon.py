"""Tiny random transformers Chameleon folders: a VQ-GAN, a Llama-like LM with per-head qk LayerNorm, and a
vocabulary whose "IMGIMG…" entries are the VQ codes (in shuffled order, so the code -> id map is exercised);
with `tokenizer=True` also the word-level tokenizer of that vocabulary, a chat template and ChameleonProcessor's
processor_config.json (image_seq_length), as a released folder has them."""

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

TEXT_TOKENS = 96
IMAGE, BOI, EOI, SEP = "<image>", "<racm3:break>", "<eoss>", "<reserved08706>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"  # ids 0-3
WORDS = ["USER", "ASSISTANT", ":"]  # ids 4-6: what the chat template writes around the text
# a LLaVA-style chat template (each turn's images first, then its text; a str content as written)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# two VQ-GANs: A without encoder attention below the middle, 8×8 codes; B with attention at 16 px and 4×4 codes
VQ_CONFIGS = {
    "A": dict(base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1, resolution=32, embed_dim=16,
              latent_channels=16, num_embeddings=64),
    "B": dict(base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=2, resolution=16,
              attn_resolutions=[16, 8], embed_dim=8, latent_channels=32, num_embeddings=128),
}  # fmt: skip
LM_CONFIGS = {
    "A": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2),
    "B": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
              swin_norm=True,
              tie_word_embeddings=True),
}  # fmt: skip


def image_token_name(code: int) -> str:
    """Return the vocabulary entry of VQ code `code`: its digits as letters A-J between IMGIMG and Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary_map(codes: int, seed: int = 0) -> dict[str, int]:
    """Return a vocabulary: text tokens, the image specials, then the code tokens at shuffled ids."""
    names = [BOS, EOS, PAD, UNK, *WORDS]
    vocab = {names[i] if i < len(names) else f"t{i}": i for i in range(TEXT_TOKENS)}
    vocab.update({IMAGE: TEXT_TOKENS, BOI: TEXT_TOKENS + 1, EOI: TEXT_TOKENS + 2, SEP: TEXT_TOKENS + 3})
    order = torch.randperm(codes, generator=torch.Generator().manual_seed(seed)).tolist()
    vocab.update({image_token_name(code): TEXT_TOKENS + 4 + slot for slot, code in enumerate(order)})
    return vocab


def write_chameleon_tokenizer(folder: Path, vocab: dict[str, int]) -> transformers.PreTrainedTokenizerFast:
    """Write a word-level tokenizer of `vocab` (bos first, the image markers and separator special) and return it."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (BOS, EOS, PAD, UNK, IMAGE, BOI, EOI, SEP)])  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        sep_token=SEP, model_max_length=512,
    )  # fmt: skip


def write_tiny_chameleon(folder: Path, name: str = "A", seed: int = 0, tokenizer: bool = False):
    """Write a tiny ChameleonForConditionalGeneration folder (weights, config, image processor; with `tokenizer`
    also tokenizer, chat template and ChameleonProcessor settings); return the model (eval mode) and its image
    processor, or with `tokenizer` its ChameleonProcessor."""
    vq = VQ_CONFIGS[name]
    vocab = vocabulary_map(vq["num_embeddings"], seed)
    torch.manual_seed(seed)
    cfg = transformers.ChameleonConfig(
        vocab_size=len(vocab) + 4, vq_config=vq, vocabulary_map=vocab, initializer_range=0.15, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, max_position_embeddings=512, **LM_CONFIGS[name],
    )  # fmt: skip
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial per-head norms, so a shared-weight norm would not pass
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    side = vq["resolution"]
    processor = transformers.ChameleonImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    if not tokenizer:
        processor.save_pretrained(folder)
        return model, processor
    per_side = side // 2 ** (len(vq["channel_multiplier"]) - 1)
    full = transformers.ChameleonProcessor(
        processor, write_chameleon_tokenizer(folder, vocab), image_seq_length=per_side**2
    )
    full.chat_template = CHAT_TEMPLATE
    full.save_pretrained(folder)
    return model, full
