"""Tiny random transformers BLIP-2 folders (EVA-style ViT + Q-Former + OPT) with an OPT-style byte-level BPE
tokenizer (`</s>` opens every text, as OPT's does) and Blip2Processor's files, as transformers 5 saves them."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, processors

from fixtures_lm import EOS, write_lm_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32  # 4×4 patches of 8 px, plus the class token: 17 tokens reach the Q-Former

# name -> (num_query_tokens, qformer_config, OPT text_config); towers and Q-Formers differ in width
CONFIGS = {
    "k4-every1-opt2x32": (4, dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                  cross_attention_frequency=1),
                          dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4)),
    "k6-every2-opt3x48": (6, dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
                                  cross_attention_frequency=2),
                          dict(hidden_size=48, ffn_dim=64, num_hidden_layers=3, num_attention_heads=6)),
}  # fmt: skip


def write_opt_tokenizer(folder: Path) -> int:
    """Write a byte-level BPE tokenizer that puts `</s>` before every text, with `<image>` added; return its id."""
    write_lm_tokenizer(folder, model_max_length=256)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 2)])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = EOS  # OPT's bos and eos are both </s>
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.token_to_id(IMAGE_TOKEN)


def write_tiny_blip2(
    folder: Path, name: str, seed: int = 0
) -> tuple[transformers.Blip2ForConditionalGeneration, transformers.Blip2Processor]:
    """Write a tiny Blip2ForConditionalGeneration folder with its Blip2Processor; return both (model in eval mode)."""
    num_queries, qformer, text = CONFIGS[name]
    image_token_id = write_opt_tokenizer(folder)
    vision = dict(hidden_size=20, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)  # fmt: skip
    opt = transformers.OPTConfig(vocab_size=image_token_id + 8, max_position_embeddings=128, bos_token_id=2,
                                 eos_token_id=2, pad_token_id=0, word_embed_proj_dim=text["hidden_size"],
                                 init_std=0.15, **text)  # fmt: skip
    cfg = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt.to_dict(),
                                   num_query_tokens=num_queries, image_token_index=image_token_id)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    with (
        torch.no_grad()
    ):  # transformers zeroes queries, biases and LayerNorm shifts: perturb all, so all count
        for key, p in model.named_parameters():
            if not key.startswith("language_model.") or key.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    images = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.Blip2Processor(
        image_processor=images, tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
        num_query_tokens=num_queries,
    )  # fmt: skip
    processor.save_pretrained(folder)
    return model, processor
