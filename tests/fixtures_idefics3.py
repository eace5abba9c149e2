"""Tiny random transformers Idefics3 and SmolVLM folders (SigLIP-style tower, pixel shuffle, Llama LM), with the
tokenizer's image tokens, processor settings and chat template as the hub checkpoints ship them."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from fixtures_lm import tiny_lm_config, write_lm_tokenizer

IMAGE_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]
# HuggingFaceTB/SmolVLM-256M-Instruct's template (Idefics3-8B-Llama3's starts with <|begin_of_text|> instead)
TEMPLATE = (
    "{start}{{% for message in messages %}}{{{{message['role'] | capitalize}}}}"
    "{{% if message['content'][0]['type'] == 'image' %}}{{{{':'}}}}{{% else %}}{{{{': '}}}}{{% endif %}}"
    "{{% for line in message['content'] %}}{{% if line['type'] == 'text' %}}{{{{line['text']}}}}"
    "{{% elif line['type'] == 'image' %}}{{{{ '<image>' }}}}{{% endif %}}{{% endfor %}}<end_of_utterance>\n"
    "{{% endfor %}}{{% if add_generation_prompt %}}{{{{ 'Assistant:' }}}}{{% endif %}}"
)
CLASSES = {
    "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration,
                 transformers.Idefics3ImageProcessorPil),
    "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration,
                transformers.SmolVLMImageProcessorPil),
}  # fmt: skip


def write_tiny_idefics3(
    folder: Path,
    model_type: str = "idefics3",
    scale_factor: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
    longest_edge: int = 96,
    splitting: bool = True,
    seed: int = 0,
    **lm_overrides,
) -> transformers.PreTrainedModel:
    """Write a tiny Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration folder; return the model.

    Tiles are `image_size` px (max_image_size = the tower's image_size, as in the hub checkpoints); images are
    first resized to `longest_edge`, so an image splits into at most (longest_edge / image_size)² tiles.
    The smolvlm tokenizer adds no <s> of its own (SmolLM2's does not); its template starts with <|im_start|>.
    """
    write_lm_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    start = "<|im_start|>" if model_type == "smolvlm" else "<s>"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*IMAGE_TOKENS, start]])
    if model_type == "smolvlm":
        tok.post_processor = None
    tok.save(str(folder / "tokenizer.json"))
    image_token_id = tok.token_to_id("<image>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE.format(start=start)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    config_class, model_class, processor_class = CLASSES[model_type]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)  # fmt: skip
    text = tiny_lm_config(
        "llama", vocab_size=tok.get_vocab_size() + 4, initializer_range=0.15, **lm_overrides
    )
    torch.manual_seed(seed)
    cfg = config_class(
        vision_config=vision, text_config=text.to_dict(), image_token_id=image_token_id,
        scale_factor=scale_factor, tie_word_embeddings=text.tie_word_embeddings,
    )  # fmt: skip
    model = model_class(cfg).eval()
    with torch.no_grad():  # larger tower and connector weights so image features move the logits clearly
        model.model.connector.modality_projection.proj.weight.normal_(0, 0.3)
        model.model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    processor_class(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=splitting,
    ).save_pretrained(folder)
    tokens_per_tile = (image_size // patch_size) ** 2 // scale_factor**2
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": tokens_per_tile}))
    return model
