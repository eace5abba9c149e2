"""Tiny random transformers Qwen2-VL and Qwen2.5-VL folders (native-resolution tower, patch merger, M-RoPE Qwen2
LM), with Qwen's special tokens, chat template and image processor settings as the hub checkpoints ship them."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from fixtures_lm import tiny_lm_config, write_lm_tokenizer

SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen/Qwen2-VL-2B-Instruct's chat template without its video branch
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLASSES = {
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
}


def tiny_vision(model_type: str, patch_size: int, window_size: int) -> dict:
    """Return a 2-block, 32-wide vision config (2 heads, merge 2, temporal patch 2) of `model_type`."""
    common = dict(depth=2, num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.15)  # fmt: skip
    if model_type == "qwen2_vl":
        return dict(common, embed_dim=32, mlp_ratio=2, hidden_size=64)
    # window attention in block 0, full attention in block 1
    return dict(common, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=window_size,
                fullatt_block_indexes=[1])  # fmt: skip


def write_tiny_qwen2_vl(
    folder: Path,
    model_type: str = "qwen2_vl",
    patch_size: int = 14,
    window_size: int = 56,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 20 * 28 * 28,
    seed: int = 0,
    **lm_overrides,
) -> transformers.PreTrainedModel:
    """Write a tiny Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration folder; return the model.

    Images are resized to between `min_pixels` and `max_pixels` (in multiples of 2·patch_size), so they become a
    few dozen patches; the LM's 16-wide heads split M-RoPE's 8 frequencies as [2, 3, 3].
    """
    write_lm_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = None  # Qwen's tokenizer adds no <s>
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    config_class, model_class = CLASSES[model_type]
    text = tiny_lm_config("qwen2", vocab_size=tok.get_vocab_size() + 4, initializer_range=0.15,
                          max_position_embeddings=1024, **lm_overrides).to_dict()  # fmt: skip
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    torch.manual_seed(seed)
    cfg = config_class(
        vision_config=tiny_vision(model_type, patch_size, window_size), text_config=text,
        image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
        vision_start_token_id=tok.token_to_id("<|vision_start|>"),
        vision_end_token_id=tok.token_to_id("<|vision_end|>"), tie_word_embeddings=text["tie_word_embeddings"],
    )  # fmt: skip
    model = model_class(cfg).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1, which would test neither
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
            elif "norm" in name or "ln_q" in name:
                p.normal_(1, 0.2)
    model.save_pretrained(folder)
    transformers.Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
    ).save_pretrained(folder)
    return model


def reference_processor(folder: Path, model_type: str):
    """transformers' own Qwen2-VL (or Qwen2.5-VL) processor for the folder, without its video processor."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
    processor = (
        transformers.Qwen2VLProcessor if model_type == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    )
    with pytest.MonkeyPatch.context() as patch:  # the video processor (torchvision) is not under test
        patch.setattr(processor, "check_argument_for_proper_class", lambda *a: None)
        return processor(image_processor, tokenizer, None, chat_template=TEMPLATE)
