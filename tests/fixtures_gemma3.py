"""Tiny random transformers Gemma 3 folders (SigLIP tower, pooled projector, Gemma 3 LM with sliding-window and
global layers), with Gemma's image tokens, a Gemma-style chat template and its image processor settings."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from fixtures_lm import write_lm_tokenizer

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL = ["<start_of_turn>", "<end_of_turn>", BOI, EOI, SOFT]
# google/gemma-3-4b-it's template, reduced to user/model turns with image and text parts
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def write_tiny_gemma3(folder: Path, seed: int = 0, image_size: int = 32, patch_size: int = 4,
                      mm_tokens_per_image: int = 4, **text_overrides) -> transformers.PreTrainedModel:  # fmt: skip
    """Write a tiny Gemma3ForConditionalGeneration folder; return the model.

    The LM has 3 layers (sliding, sliding, global) of width 64, a sliding window of 8 (so a prompt with an
    image crosses it), head_dim 16 and query_pre_attn_scalar 24 (not head_dim, so the scale is tested).
    """
    write_lm_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(chat_template=TEMPLATE, boi_token=BOI, eoi_token=EOI, image_token=SOFT,
                  extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    text = dict(vocab_size=tok.get_vocab_size() + 4, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                initializer_range=0.15, rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})  # fmt: skip
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, vision_use_head=False)  # fmt: skip
    torch.manual_seed(seed)
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tok.token_to_id(BOI), eoi_token_index=tok.token_to_id(EOI),
        image_token_index=tok.token_to_id(SOFT), initializer_range=0.15,
        tie_word_embeddings=text.get("tie_word_embeddings", True),
    )  # fmt: skip
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with (
        torch.no_grad()
    ):  # transformers starts norms at 0 (scale 1) and biases at 0, which would test neither
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.normal_(0, 0.2)
            elif "mm_input_projection" in name:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    transformers.Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(
        folder
    )
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": mm_tokens_per_image}))
    return model


def reference_processor(folder: Path) -> transformers.Gemma3Processor:
    """transformers' own Gemma 3 processor for the folder."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    image_processor = transformers.Gemma3ImageProcessorPil.from_pretrained(folder)
    seq = json.loads((folder / "processor_config.json").read_text())["image_seq_length"]
    return transformers.Gemma3Processor(
        image_processor, tokenizer, chat_template=TEMPLATE, image_seq_length=seq
    )
