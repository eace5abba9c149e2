"""`mmlm study fusion`: every fusion style trained on the same shapes-world budget, then measured side by side.

Each style gets the demo's VLM recipe (src/mmlm/recipes/demo_vlm.py): the same scene-tuned vision tower, the same
2-layer LM, tokenizer, data, seed and steps; only `connector.kind` changes. For each it records the visual
tokens one image costs the LM, the training time, prefill latency and decode speed at batch 1 on this machine,
and VQA accuracy on test questions (exact match after VQA normalisation; images never seen in training).
It writes results.json, fusion.png (accuracy against visual tokens) and table.md under --out.
"""

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import mmlm
from mmlm.data.synthetic import shapes
from mmlm.errors import InputError
from mmlm.eval.vqa import question_messages
from mmlm.fusion import ConnectorConfig, fusion_style
from mmlm.inference.generation import GenerationSettings, generate_ids
from mmlm.recipes.demo_vlm import demo_vlm_config, example_scene
from mmlm.train.vlm_loop import run_vlm_training

# style -> connector options at the demo's sizes (vision width 128, 16 patches, LM width 128, 2 layers)
STYLES: dict[str, dict[str, Any]] = {
    "mlp": {},
    "linear": {},
    "pixel_shuffle": {"scale_factor": 2},
    "qformer": {"num_queries": 8, "depth": 2, "heads": 4},
    "perceiver": {"num_queries": 8, "depth": 2, "heads": 4},
    "cross_attention": {"num_queries": 8, "depth": 2, "heads": 4, "cross_attn_every_n_layers": 1},
    "unified": {"codebook_size": 256},
}
QUESTION = "What color is the square?"


def style_config(kind: str, out: Path, tower: Path, steps: int, eval_samples: int):
    """Return the demo's VLM run with fusion style `kind` and `steps` instruction-tuning steps."""

    cfg = demo_vlm_config(out, tower, eval_samples)
    cfg.model.connector = ConnectorConfig(kind=kind, **STYLES[kind])
    if not fusion_style(kind).has_weights:  # unified: the LM learns the codes' embeddings instead
        cfg.stages["align"].train = ["lm"]
    instruct = cfg.stages["instruct"]
    instruct.steps, instruct.vision_from_step = steps, steps * 2 // 3
    cfg.out_dir = str(out / kind)
    return cfg


@torch.inference_mode()
def speed(loaded: Any, image: Any, new_tokens: int = 32, repeats: int = 5) -> tuple[float, float]:
    """Return (prefill ms, decode tokens/s) at batch 1 for one image and a question, medians of `repeats` runs.

    Decoding ignores end tokens so that every style decodes exactly `new_tokens` tokens.
    """

    loaded.model.eval()
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        step, kv, settings, embeds, mask = loaded.prepare(
            [question_messages(QUESTION)], [[image]], GenerationSettings(new_tokens), "dynamic"
        )
        steps = generate_ids(step, kv, settings, [], None, embeds, mask)
        next(steps)  # the prefill's token
        first = time.perf_counter()
        count = sum(1 for _ in steps)
        prefill.append((first - start) * 1000)
        decode.append(count / (time.perf_counter() - first))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def run_style(kind: str, out: Path, tower: Path, steps: int, eval_samples: int) -> dict[str, Any]:
    """Train and measure one style; return its row of the study."""

    torch.manual_seed(0)
    cfg = style_config(kind, out, tower, steps, eval_samples)
    start = time.perf_counter()
    loaded, records = run_vlm_training(cfg)
    seconds = time.perf_counter() - start
    final = records[-1]
    image = shapes.render(example_scene(), loaded.config.vision.image_size)
    prefill_ms, tokens_per_s = speed(loaded, image)
    scores = {k.removeprefix("vqa_"): v for k, v in final.items() if k.startswith("vqa_")}
    return {
        "style": kind,
        "visual_tokens": loaded.model.image_tokens,
        "train_seconds": round(seconds, 1),
        "prefill_ms": round(prefill_ms, 2),
        "decode_tokens_per_s": round(tokens_per_s, 1),
        "parameters_between": sum(p.numel() for p in loaded.model.connector.parameters()),
        "final_loss": final["loss"],
        **{f"vqa_{k}": v for k, v in scores.items()},
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Return the study as a Markdown table."""
    head = ("| style | visual tokens / image | connector parameters | train s | prefill ms | decode tok/s "
            "| VQA accuracy | count | color | relation | presence | text |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        per_type = " | ".join(f"{r.get(f'vqa_accuracy_{t}', float('nan')):.3f}"
                              for t in ("count", "color", "relation", "presence", "text"))  # fmt: skip
        lines.append(f"| {r['style']} | {r['visual_tokens']} | {r['parameters_between']:,} | {r['train_seconds']} "
                     f"| {r['prefill_ms']} | {r['decode_tokens_per_s']} | {r['vqa_accuracy']:.3f} | {per_type} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write a PNG of VQA accuracy against visual tokens per image, one labelled point per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    placed: list[tuple[float, float]] = []
    for r in rows:
        point = (r["visual_tokens"], r["vqa_accuracy"])
        ax.scatter(*point, s=40)
        below = sum(
            1 for p in placed if p[0] == point[0] and abs(p[1] - point[1]) < 0.01
        )  # stack close labels
        ax.annotate(r["style"], point, textcoords="offset points", xytext=(5, 4 - 10 * below), fontsize=8)
        placed.append(point)
    ax.set(xscale="log", xlabel="visual tokens per image in the LM sequence (log)", ylabel="VQA accuracy (test)",
           title="fusion styles on the shapes world, same training budget")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def remeasure(out: Path) -> list[dict[str, Any]]:
    """Measure prefill and decode again on the styles' saved models (for a quieter machine); update the files."""

    results = out / "results.json"
    if not results.is_file():
        raise InputError(f"{results}: no study results to measure again; run `mmlm study fusion` first")
    rows = json.loads(results.read_text())
    for row in rows:
        loaded = mmlm.load(out / row["style"] / "model")
        image = shapes.render(example_scene(), loaded.config.vision.image_size)
        prefill_ms, tokens_per_s = speed(loaded, image, repeats=9)
        row.update(prefill_ms=round(prefill_ms, 2), decode_tokens_per_s=round(tokens_per_s, 1))
    results.write_text(json.dumps(rows, indent=2) + "\n")
    (out / "table.md").write_text(table(rows) + "\n")
    return rows


def study_fusion(
    out: Path, tower: Path, steps: int, styles: list[str], eval_samples: int
) -> list[dict[str, Any]]:
    """Run the study for `styles`; write results.json, table.md and fusion.png under `out`; return the rows."""
    if not (tower / "config.json").is_file():
        raise InputError(f"--vision {tower}: no checkpoint there; `make demo` writes runs/demo/vlm_tower")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in styles:
        print(f"== {kind}")
        rows.append(run_style(kind, out, tower, steps, eval_samples))
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")  # kept after each style
    (out / "table.md").write_text(table(rows) + "\n")
    plot(rows, out / "fusion.png")
    return rows
