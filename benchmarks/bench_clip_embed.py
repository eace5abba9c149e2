"""CLIP embedding throughput on CPU: mmlm's DualEncoder against transformers' CLIPModel, same weights, same tensors.

A CLIPModel with random weights at real ViT-B/32 or ViT-B/16 shapes is saved to a temporary folder and read
back with `mmlm.load`. Both implementations then embed the same pixels and the same token ids, model only
(preprocessing excluded), fp32, under `torch.inference_mode`, alternating round by round and reversing which
goes first every round (timing.py); medians, min and max are reported.

    python benchmarks/bench_clip_embed.py --arch b32
    python benchmarks/bench_clip_embed.py --quick     # a 2-layer CLIP, 1 round: checks that it runs
"""

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from timing import interleaved_seconds, rate_spread
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

import mmlm

# CLIP's byte-level BPE puts its two special tokens last in a 49,408-entry vocabulary.
VOCAB_SIZE, BOS_ID, EOS_ID = 49408, 49406, 49407
PAD_ID = EOS_ID  # openai/clip-vit-base-patch32's tokenizer pads with <|endoftext|>
VISION_PATCH = {"b32": 32, "b16": 16}
TEXT_BATCH = 256
CAPTION_TOKENS = (10, 20)  # with <|startoftext|> and <|endoftext|>; COCO captions land here


def reference_clip(arch: str) -> transformers.CLIPModel:
    """Return a randomly initialised transformers CLIPModel at ViT-B/32 or ViT-B/16 shapes (or toy ones), in eval mode."""
    torch.manual_seed(0)
    if arch == "tiny":  # --quick: the real vocabulary and 224 px, two narrow layers per tower
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                             bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=224, patch_size=32, hidden_act="quick_gelu"),
            projection_dim=16,
        )  # fmt: skip
        return transformers.CLIPModel(cfg).eval()
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=VISION_PATCH[arch], hidden_act="quick_gelu"),
        projection_dim=512,
    )  # fmt: skip
    return transformers.CLIPModel(cfg).eval()


def write_stand_in_tokenizer(folder: Path) -> None:
    """Write a tokenizer.json holding only CLIP's special tokens at their real ids.

    `mmlm.load` reads the folder's tokenizer, but the benchmark feeds token ids directly, so the vocabulary
    itself never runs; building the real 49k-entry BPE offline is not needed to time the model.
    """
    vocab = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=list(vocab.items())
    )
    tokenizer.save(str(folder / "tokenizer.json"))


def caption_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask) [n, L] as CLIPProcessor(padding=True) gives them: right-padded to the longest."""
    lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (n,), generator=generator)
    longest = int(lengths.max())
    ids = torch.full((n, longest), PAD_ID)
    mask = torch.zeros(n, longest, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        words = torch.randint(0, BOS_ID, (length - 2,), generator=generator)
        ids[row, :length] = torch.cat([torch.tensor([BOS_ID]), words, torch.tensor([EOS_ID])])
        mask[row, :length] = 1
    return ids, mask


def measure(
    task: str,
    unit: str,
    items: int,
    reference: Callable[[], torch.Tensor],
    ours: Callable[[], torch.Tensor],
    args: argparse.Namespace,
) -> dict:
    """Return one measurement: medians of both implementations, their ratio and the embeddings' max |diff|."""
    with torch.inference_mode():
        diff = (F.normalize(reference(), dim=-1) - ours()).abs().max().item()
        seconds = interleaved_seconds({"transformers": reference, "mmlm": ours}, args.repeats, args.warmup)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {
        "task": task,
        "arch": args.arch,
        "batch": items,
        "repeats": args.repeats,
        f"transformers_{unit}_per_s": round(items / median["transformers"], 2),
        f"mmlm_{unit}_per_s": round(items / median["mmlm"], 2),
        "ratio_mmlm_over_transformers": round(median["transformers"] / median["mmlm"], 3),
        "max_abs_diff": diff,
        f"{unit}_per_s_spread": {name: rate_spread(s, items, 2) for name, s in seconds.items()},
        "transformers_s": [round(s, 4) for s in seconds["transformers"]],
        "mmlm_s": [round(s, 4) for s in seconds["mmlm"]],
    }


def parse_args() -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(VISION_PATCH), default="b32", help="vision tower shape")
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="image batch sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per implementation first")
    parser.add_argument("--text-batch", type=int, default=TEXT_BATCH, help="captions per text batch")
    parser.add_argument("--quick", action="store_true", help="a 2-layer CLIP, 1 round: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.batch, args.text_batch, args.repeats = "tiny", [2], 8, 1
    if min(args.batch) < 1 or args.text_batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch, --text-batch and --repeats must be positive, --warmup non-negative")
    return args


def main() -> None:
    """Time both implementations and print one JSON line per measurement, then a summary."""
    args = parse_args()
    reference = reference_clip(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        write_stand_in_tokenizer(Path(tmp))
        dual_encoder = mmlm.load(tmp).model.eval()

    setup = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": reference.config._attn_implementation,
        # other processes on a small machine skew every figure; the load average shows when they ran
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps({"setup": setup}))
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in args.batch:
        pixels = torch.randn(batch, 3, 224, 224, generator=generator)
        results.append(
            measure(
                "image",
                "images",
                batch,
                lambda pixels=pixels: reference.get_image_features(pixel_values=pixels).pooler_output,
                lambda pixels=pixels: dual_encoder.encode_image(pixels),
                args,
            )
        )
        print(json.dumps(results[-1]))
    ids, mask = caption_batch(args.text_batch, generator)
    results.append(
        measure(
            "text",
            "texts",
            args.text_batch,
            lambda: reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
            lambda: dual_encoder.encode_text(ids),
            args,
        )
    )
    results[-1]["padded_length"] = ids.shape[1]
    print(json.dumps(results[-1]))
    print(json.dumps({"load_average_1m_after": os.getloadavg()[0]}))

    print(f"\n{args.arch}, fp32, {setup['threads']} threads, torch {torch.__version__}")
    for r in results:
        unit = "images" if r["task"] == "image" else "texts"
        print(
            f"{r['task']:>5} batch {r['batch']:>3}: transformers {r[f'transformers_{unit}_per_s']:8.2f} {unit}/s"
            f"  mmlm {r[f'mmlm_{unit}_per_s']:8.2f} {unit}/s  ratio {r['ratio_mmlm_over_transformers']:.3f}"
            f"  max|Δ| {r['max_abs_diff']:.2e}"
        )


if __name__ == "__main__":
    main()
