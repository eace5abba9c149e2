"""Tiny random transformers LLaVA folders (CLIP or SigLIP tower + Llama LM), with tokenizer, image processor
and chat template, as a Hugging Face checkpoint ships them."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from fixtures_lm import tiny_lm_config, write_lm_tokenizer

IMAGE_TOKEN = "<image>"
# llava-1.5-hf's template, in short: "USER: <image>\n... ASSISTANT: ...</s>"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def write_llava_tokenizer(folder: Path, model_max_length: int = 128) -> int:
    """Write the tiny LM tokenizer with `<image>` added and LLaVA's chat template; return the image token id."""
    write_lm_tokenizer(folder, model_max_length=model_max_length)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAVA_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.token_to_id(IMAGE_TOKEN)


def write_tiny_llava(
    folder: Path,
    tower: str = "clip",
    feature_layer: int | list[int] = -2,
    select: str = "default",
    seed: int = 0,
    **lm_overrides,
) -> transformers.LlavaForConditionalGeneration:
    """Write a tiny LlavaForConditionalGeneration folder and return the model (eval mode)."""
    image_token_id = write_llava_tokenizer(folder)

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    if tower == "clip":
        vision_cfg = transformers.CLIPVisionConfig(**vision)
    else:
        vision_cfg = transformers.SiglipVisionConfig(**vision)
    text_cfg = tiny_lm_config("llama", vocab_size=image_token_id + 8, initializer_range=0.15, **lm_overrides)
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token_id,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=select,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger projector weights so image features move the logits clearly
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    if tower == "clip":
        transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(folder)
    else:
        transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def write_tiny_llava_processor_save(folder: Path, tower: str = "clip", **llava_options):
    """Write a tiny LLaVA folder the way transformers 5 saves one (`LlavaForConditionalGeneration.save_pretrained`
    + `LlavaProcessor.save_pretrained`: processor_config.json, chat_template.jinja, no preprocessor_config.json);
    return (model, processor)."""
    parts = folder.parent / f"{folder.name}-parts"
    model = write_tiny_llava(parts, tower=tower, **llava_options)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(parts, backend="pil"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(parts),
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=int(tower == "clip"),  # CLIP's class token
        chat_template=LLAVA_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


# image_grid_pinpoints of the tiny LLaVA-NeXT folders: 1x1, 1x2, 2x1 and 2x2 tiles of 32 px
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def write_tiny_llava_next(
    folder: Path,
    tower: str = "clip",
    select: str = "default",
    pinpoints: list[list[int]] = TINY_PINPOINTS,
    lm: str = "llama",
    processor_file: bool = False,
    seed: int = 0,
    **lm_overrides,
) -> tuple[transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextProcessor]:
    """Write a tiny LlavaNextForConditionalGeneration folder (32-px tiles of 4x4 patches) and return the model
    (eval mode) and its LlavaNextProcessor; `processor_file` saves the image settings as transformers 5's
    processor_config.json, else as preprocessor_config.json."""
    image_token_id = write_llava_tokenizer(folder, model_max_length=512)

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    vision_cfg = (transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig)(
        **vision
    )
    lm_settings = dict(initializer_range=0.15, max_position_embeddings=512, **lm_overrides)
    text_cfg = tiny_lm_config(lm, vocab_size=image_token_id + 8, **lm_settings)
    torch.manual_seed(seed)
    cfg = transformers.LlavaNextConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token_id,
        vision_feature_select_strategy=select, image_grid_pinpoints=pinpoints,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )  # fmt: skip
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger projector weights and newline so image features move the logits clearly
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.3)
        model.model.image_newline.normal_(0, 1.0)
    model.save_pretrained(folder)
    if tower == "clip":
        images = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
        )
    else:  # SigLIP's squash to a square, no centre crop; crop_size still sets the tile side
        images = transformers.LlavaNextImageProcessorPil(
            size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False,
            image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=pinpoints,
        )  # fmt: skip
    processor = transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=transformers.AutoTokenizer.from_pretrained(folder), patch_size=8,
        vision_feature_select_strategy=select, num_additional_image_tokens=int(tower == "clip"),
        chat_template=LLAVA_TEMPLATE,
    )  # fmt: skip
    if processor_file:
        processor.save_pretrained(folder)
    else:
        images.save_pretrained(folder)
    return model, processor
