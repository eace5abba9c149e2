"""Tiny random transformers Idefics (v1) folders: CLIP-style tower, optional Perceiver resampler, Llama LM with
gated cross-attention blocks, the two decoupled tokens, and IdeficsImageProcessor's settings."""

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from fixtures_lm import write_lm_tokenizer

ADDED = ["<fake_token_around_image>", "<image>"]  # idefics-9b's order: the additional vocabulary's two tokens


def write_tiny_idefics(
    folder: Path,
    layers: int = 2,
    cross_layer_interval: int = 1,
    use_resampler: bool = True,
    qk_layer_norms: bool = False,
    alpha_type: str = "float",
    seed: int = 0,
) -> transformers.IdeficsForVisionText2Text:
    """Write a tiny IdeficsForVisionText2Text folder (32-px images of 4x4 patches) and return the model (eval)."""
    vocab = write_lm_tokenizer(folder, model_max_length=256)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    tok.save(str(folder / "tokenizer.json"))
    vision = dict(embed_dim=24, image_size=32, patch_size=8, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    perceiver = dict(resampler_n_latents=5, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=6,
                     qk_layer_norms_perceiver=qk_layer_norms)  # fmt: skip
    config = transformers.IdeficsConfig(
        vocab_size=vocab, additional_vocab_size=len(ADDED), hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256, initializer_range=0.3,
        cross_layer_interval=cross_layer_interval, use_resampler=use_resampler, qk_layer_norms=qk_layer_norms,
        alpha_type=alpha_type, alpha_initializer="ones", vision_config=vision,
        perceiver_config=perceiver, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # random gates (α = 0 would hide the images) and larger tower positions
        model.model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.5)
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(0, 1.0)
            layer.alpha_dense.normal_(0, 1.0)
    model.save_pretrained(folder)
    transformers.IdeficsImageProcessorPil(image_size=32).save_pretrained(folder)
    return model


def vocab_size(folder: Path) -> int:
    """Return the folder's tokenizer vocabulary, added tokens included."""
    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
