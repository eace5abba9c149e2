"""Tiny random transformers CLIP and SigLIP folders, complete with tokenizer and preprocessor files."""

import json
from pathlib import Path

import torch
import transformers

from fixtures_text import write_clip_tokenizer, write_siglip2_tokenizer, write_siglip_tokenizer


def write_tiny_clip(
    folder: Path, image_size: int = 32, patch: int = 8, act: str = "quick_gelu", seed: int = 0
):
    """Write a tiny CLIPModel folder and return the transformers model."""
    tok_dir, vocab = write_clip_tokenizer(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=16,
    )  # fmt: skip
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(folder)
    return model


def write_tiny_siglip(folder: Path, image_size: int = 32, patch: int = 8, seed: int = 0):
    """Write a tiny SiglipModel folder and return the transformers model."""
    _, vocab = write_siglip_tokenizer(folder, model_max_length=16)
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch),
    )  # fmt: skip
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.7)
        model.logit_bias.fill_(-12.5)
    model.save_pretrained(folder)
    transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(
        folder
    )
    return model


def preprocessor_type(folder: Path) -> str:
    """Return the image_processor_type written in a folder's preprocessor_config.json."""
    return json.loads((folder / "preprocessor_config.json").read_text()).get("image_processor_type", "")


def write_tiny_siglip2(
    folder: Path,
    num_patches: int = 16,
    patch: int = 4,
    max_num_patches: int = 24,
    head: bool = True,
    seed: int = 0,
):
    """Write a tiny Siglip2Model (NaFlex) folder and return the transformers model: a sqrt(num_patches)-square
    position grid, images resized to at most `max_num_patches` patches of `patch` px."""
    _, vocab = write_siglip2_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = transformers.Siglip2Config(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_patches=num_patches, patch_size=patch, vision_use_head=head),
    )  # fmt: skip
    model = transformers.Siglip2Model(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.7)
        model.logit_bias.fill_(-12.5)
    model.save_pretrained(folder)
    processor = transformers.Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_num_patches)
    processor.save_pretrained(folder)
    return model
