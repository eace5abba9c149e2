"""The VLM part of `make demo`: a LLaVA-style model on the demo CLIP's vision tower, trained on CPU in minutes.

  tower     the CLIP's ViT, fine-tuned to read each scene's labels from its patch tokens (see below);
  pretrain  a tiny Llama-style LM (2 layers, width 128, a BPE trained on the data, Llama's initialisation)
            learns the shapes world's templated text (text only, α = 0);
  align     LLaVA stage 1: the MLP connector alone, on captions ("Describe the image."), ViT and LM frozen;
  instruct  LLaVA stage 2: connector + LM on all question types, up to 3 questions per image as one
            conversation, with 5% text-only samples mixed in; the ViT's last block unfreezes for the final third.
Every training sample (and the BPE's text) uses only the train side of `shapes.split_world(seed)`; the figures
are on images of the held-out side (colour×shape pairs, words and chart bars no training sample showed):
VQA (greedy, exact match after VQA normalisation) on the validation stream, used while tuning, and on the test
stream, scored once (captions apart, with CIDEr-D); the blind (grey image) and no-image probes beside the answer
prior; POPE through `mmlm eval vlm`'s harness (see `mmlm.recipes.demo_vlm_eval`).

What limits it is the LM, not only the pixels: `mmlm study ladder` (docs/demo-ladder.md) trains this LM on the
scene spelled out as text, on oracle slot features and on a tower. Presence, count and relation stay at the
answer prior on every rung within this budget, even with the scene given exactly; colour, text and chart
questions are learnt, and several questions per image learn them from far fewer images. Presence and relation
answers are 50/50 yes/no, so neither the image nor the question alone predicts them: a fresh LM sits at a
saddle there. On oracle slots a curriculum (colour questions, then presence alone) unlocks presence; in this
recipe, at this budget, it does not yet (`VLMDemoBudget.curriculum`, benchmarks/vlm_demo_ablation.py).
The pixels mattered too: a CLIP trained only on captions that name colour and shape together learnt each seen
pair as a whole, and its tower mistook held-out pairs' shapes; greyscale, colour-free views in the CLIP's training
(`DataConfig.shapes_colourless`) took this VLM's test VQA on seed 0 from 0.374 to 0.448 (exact match over
questions and captions together; docs/benchmarks.md). The tuned tower still names a held-out pair's shape per
grid cell right only 0.52-0.69 of the time, against 0.94-0.96 for seen pairs (`cell_accuracy`,
benchmarks/vlm_tower_probe.py), and every test question about a held-out pair names it; views in colours that
no word names in the tuning raise that to 0.72-0.79 without lifting the VLM (docs/demo-ladder.md).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mmlm
from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.instructions import QUESTION_TYPES
from mmlm.errors import InputError
from mmlm.eval.tasks import POPE_SPLITS
from mmlm.eval.vqa import exact_match
from mmlm.fusion import ConnectorConfig
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.vision import VisionConfig
from mmlm.recipes.demo_vlm_eval import answer_prior, pope_summary, questions, vqa_figures
from mmlm.train.config import OptimConfig
from mmlm.train.optim import build_scheduler
from mmlm.train.vlm_config import DataLoading, StageConfig, StageData, VLMParts, VLMTrainConfig
from mmlm.train.vlm_loop import run_vlm_training

EXAMPLE_QUESTION, EXAMPLE_ANSWER = "What word is written?", "cake"
# 1,050 instruction steps keep the whole `make demo` under 600 s on 2 cores with the 48-px tower: with 1,200 it
# took 579-628 s over three seeds (the slowest on a machine running 5% slow), with 1,700 711 s
TOWER_STEPS, INSTRUCT_STEPS = 200, 1050
# question types whose answer the image alone already hints at (a colour or count in the scene, the word, a bar);
# presence and relation answers are yes/no drawn 50/50, informative only in the question *and* the image together
LOOKUP_TYPES = ("color", "count", "text", "chart")


@dataclass
class VLMDemoBudget:
    """The demo VLM's step counts and evaluation sizes (a test shrinks them to run the whole path in seconds)."""

    tower_steps: int = TOWER_STEPS
    # share of scene-label images without their named colours in the tower's tuning, and their view: in random
    # unnamed colours (which name held-out shapes best in the probe) or greyscale
    tower_colourless: float = 0.0
    tower_colourless_view: str = "unnamed"
    pretrain_steps: int = 100
    align_steps: int = 50
    instruct_steps: int = INSTRUCT_STEPS
    eval_samples: int = 420  # validation and test questions each
    pope_samples: int = 200  # shapes-pope questions (the built-in task holds 200)
    batch_size: int = 64
    turns: int = (
        3  # questions per training image (the ladder: colour, text and chart learn from far fewer images)
    )
    # a curriculum: (stage name, steps, question types) stages that take their steps from instruct_steps and run
    # before it, in order; () trains on every type throughout
    curriculum: tuple[tuple[str, int, tuple[str, ...]], ...] = ()


def demo_vlm_config(
    out: Path, tower_folder: Path | None, eval_samples: int = 420, budget: VLMDemoBudget | None = None,
    seed: int = 0,
) -> VLMTrainConfig:  # fmt: skip
    """Return the demo's VLM run: the tuned CLIP tower (or a fresh one), a 2-layer LM, an MLP connector, 3 stages."""
    budget = budget or VLMDemoBudget()
    lm = LMConfig(width=128, layers=2, heads=4, kv_heads=4, mlp_dim=256, tie_word_embeddings=True)
    vision = VisionConfig(image_size=32, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512, act="gelu",
                          embed_dim=None, stem="conv")  # fmt: skip
    parts = VLMParts(vision_init=None if tower_folder is None else str(tower_folder), vision=vision, lm=lm,
                     connector=ConnectorConfig(kind="mlp"), feature_layers=[-1], vocab_size=512)  # fmt: skip
    text = StageData(multimodal_fraction=0.0, text_source="shapes", text_samples=20_000)
    instruct = budget.instruct_steps - sum(steps for _, steps, _ in budget.curriculum)
    curriculum = {name: StageConfig(steps=steps, train=["connector", "lm"],
                                    data=StageData(samples=100_000, multimodal_fraction=0.95, text_source="shapes",
                                                   turns=budget.turns, question_types=list(types)),
                                    optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=30))
                  for name, steps, types in budget.curriculum}  # fmt: skip
    stages = {
        "pretrain": StageConfig(steps=budget.pretrain_steps, train=["lm"], data=text,
                                optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=15)),
        "align": StageConfig(steps=budget.align_steps, train=["connector"], data=StageData(
                             question_types=["caption"], samples=5_000),
                             optim=OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=10)),
        **curriculum,
        "instruct": StageConfig(steps=instruct, train=["connector", "lm"], vision_layers=1,
                                vision_from_step=instruct * 2 // 3,
                                data=StageData(samples=100_000, multimodal_fraction=0.95, text_source="shapes",
                                               turns=budget.turns),
                                optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=30)),
    }  # fmt: skip
    # the shapes world draws its samples in microseconds: on the demo's 2 cores, loader workers only take CPU
    # from the training step (150 steps of this run: 51.1 s with 2 workers, 43.8 s with none; same batches)
    return VLMTrainConfig(model=parts, stages=stages, batch_size=budget.batch_size, max_length=128,
                          eval_samples=eval_samples, out_dir=str(out / "vlm_train"), log_every=10, device="cpu",
                          seed=seed, data=DataLoading(workers=0))  # fmt: skip


# ---- scene-label pre-training of the vision tower ----
# The CLIP learns from whole-image captions, so its patch tokens need not say what is where (on the 32-px tower
# of an earlier demo, a linear probe on them named a lone shape no better than one on a random tower's). As
# bottom-up-attention VQA models train their detector on object and attribute labels (Anderson et al. 2018), the
# tower is fine-tuned to read each scene's ground truth from its patch tokens before the VLM is built: per grid
# cell the shape, colour and size; the word and its colour; each bar's colour and height. Only the train split's
# colour×shape pairs are used. Greyscale views here (`colourless`), unlike in the CLIP's training, lowered the
# VLM's validation accuracy (0.44 -> 0.38 on seed 0; docs/benchmarks.md), so the demo keeps them off.
SCENE_KINDS = ("objects", "text", "chart")
COLOR_NAMES, MAX_BARS = list(shapes.COLORS), 4
# (name, classes) of each target; class 0 is "empty"/"no bar" where there is one
TARGETS = ([("kind", 3)] + [(f"shape{c}", 9) for c in range(9)] + [(f"color{c}", 9) for c in range(9)]
           + [(f"size{c}", 3) for c in range(9)] + [("word", len(shapes.WORDS)), ("word_color", 8)]
           + [(f"bar_color{b}", 9) for b in range(MAX_BARS)] + [(f"bar_height{b}", 10) for b in range(MAX_BARS)])  # fmt: skip
CELL_ATTRIBUTES = ("shape", "color", "size")  # the per-cell targets, in TARGETS' order
COLOUR_TARGETS = torch.tensor(["color" in name for name, _ in TARGETS])  # masked on greyscale views


def scene_targets(scene: shapes.Scene) -> list[int]:
    """Return a scene's class index for every target of TARGETS (-100 where the target does not apply)."""
    ignore = -100
    kind = scene.kind
    cells = {shapes.cell_of(o)[0] * 3 + shapes.cell_of(o)[1]: o for o in scene.objects}
    objects = kind == "objects"
    targets = [SCENE_KINDS.index(kind)]
    for attribute, names in (("shape", shapes.SHAPES), ("color", COLOR_NAMES), ("size", shapes.SIZES)):
        targets += [(names.index(getattr(cells[c], attribute)) + 1 if c in cells else 0) if objects else ignore
                    for c in range(9)]  # fmt: skip
    word = scene.word
    targets += [shapes.WORDS.index(word.word), COLOR_NAMES.index(word.color)] if word else [ignore, ignore]
    chart = scene.chart
    bars = list(zip(chart.labels, chart.heights, strict=True)) if chart else []
    targets += [(COLOR_NAMES.index(bars[b][0]) + 1 if b < len(bars) else 0) if chart else ignore
                for b in range(MAX_BARS)]  # fmt: skip
    targets += [(bars[b][1] if b < len(bars) else 0) if chart else ignore for b in range(MAX_BARS)]
    return targets


def scene_views(
    scenes: list[shapes.Scene], colourless: np.ndarray, image_size: int, rng: np.random.Generator,
    view: str = "unnamed",
) -> tuple[list[Any], torch.Tensor]:  # fmt: skip
    """Return the scenes' images, where `colourless` without their named colours (`shapes.colourless`'s `view`),
    and their targets [B, len(TARGETS)] (a colourless view has no colour target)."""
    images = [shapes.colourless(s, "", image_size, rng, view)[0] if c else shapes.render(s, image_size)
              for s, c in zip(scenes, colourless, strict=True)]  # fmt: skip
    targets = torch.tensor([scene_targets(s) for s in scenes])
    targets[torch.from_numpy(np.asarray(colourless, dtype=bool))[:, None] & COLOUR_TARGETS] = -100
    return images, targets


class CellHead(nn.Module):
    """Scene labels read locally: each grid cell's shape, colour and size from the patch tokens over that cell
    alone, through one linear map shared by the 9 cells; the scene's kind, word and bars from all tokens. Its
    logits come in TARGETS' order, as `label_head`'s do."""

    def __init__(self, grid: int, width: int) -> None:
        super().__init__()
        if grid % 3:
            raise InputError(f"a cell head needs a patch grid in whole 3×3 cells, got {grid}×{grid}")
        self.side = grid // 3  # patches per cell side
        self.per_cell = [dict(TARGETS)[f"{a}0"] for a in CELL_ATTRIBUTES]  # classes, "empty" included
        self.cell = nn.Linear(self.side**2 * width, sum(self.per_cell))
        # TARGETS: kind, then 9 cells of each cell attribute, then the word's and the bars' targets
        self.kind, self.rest = TARGETS[0][1], sum(n for _, n in TARGETS[1 + 9 * len(CELL_ATTRIBUTES) :])
        self.scene = nn.Linear(grid**2 * width, self.kind + self.rest)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N·D] flattened row-major patch tokens -> [B, sum of TARGETS' classes] logits."""
        b, k = features.shape[0], self.side
        tokens = features.reshape(b, 3, k, 3, k, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, 9, -1)
        shape, colour, size = self.cell(tokens).split(self.per_cell, dim=-1)  # each [B, 9 cells, classes]
        kind, rest = self.scene(features).split([self.kind, self.rest], dim=-1)
        return torch.cat([kind, shape.flatten(1), colour.flatten(1), size.flatten(1), rest], dim=-1)


def label_head(tower: nn.Module, kind: str = "global") -> nn.Module:
    """Return a fresh head from a tower's flattened patch tokens to the logits of every target of TARGETS:
    "global", one linear map from all tokens (the demo's), or "cell", a CellHead."""
    if kind == "cell":
        return CellHead(tower.cfg.grid, tower.cfg.width)
    if kind != "global":
        raise InputError(f"head: got {kind!r}; expected 'global' or 'cell'")
    return nn.Linear(tower.cfg.grid**2 * tower.cfg.width, sum(n for _, n in TARGETS))


@torch.no_grad()
def cell_accuracy(
    tower: nn.Module,
    head: nn.Module,
    image_processor: Any,
    world: shapes.World,
    samples: int = 600,
    seed: int = 0,
) -> dict[str, float]:
    """Return how often `head` on `tower`'s patch tokens names each occupied grid cell's shape, colour and size
    right, over `samples` object scenes of `world` (feature layer -1, as pretrain_tower's default)."""
    rng = np.random.default_rng([seed, 23])
    scenes = [shapes.sample_scene(rng, world, "objects") for _ in range(samples)]
    targets = torch.tensor([scene_targets(s) for s in scenes])
    tower.eval()
    grid = tower.cfg.grid**2
    pixels = image_processor([shapes.render(s, tower.cfg.image_size) for s in scenes])
    features = tower.layer_features(pixels, [-1])[0][:, -grid:].flatten(1)
    logits = head(features).split([n for _, n in TARGETS], dim=-1)
    names = [name for name, _ in TARGETS]
    out = {}
    for attribute in CELL_ATTRIBUTES:
        hits = total = 0
        for cell in range(9):
            i = names.index(f"{attribute}{cell}")
            occupied = targets[:, i] > 0
            hits += int((logits[i].argmax(-1)[occupied] == targets[occupied, i]).sum())
            total += int(occupied.sum())
        out[attribute] = hits / max(1, total)
    return out


def pretrain_tower(
    tower: nn.Module, image_processor: Any, pairs: list | shapes.World, steps: int, batch_size: int = 128, seed: int = 0,
    lr: float = 2e-3, feature_layer: int = -1, colourless: float = 0.0, head: nn.Module | None = None,
    train_tower: bool = True, colourless_view: str = "unnamed",
) -> list[float]:  # fmt: skip
    """Fine-tune `tower` (a VisionTransformer) to predict scene labels from its patch tokens; return the losses.

    A `colourless` share of the scenes is shown without its named colours (`colourless_view`: "unnamed" colours
    or "greyscale", as `shapes.colourless`) and with no colour target, as some of the demo CLIP's are
    (DataConfig.shapes_colourless): shapes, sizes, words and bar heights are then learnt apart from colour.
    `head` (default: a fresh `label_head(tower)`) maps the flattened patch tokens to TARGETS' logits; with
    `train_tower` False only the head learns (a linear probe of the tower as it is)."""
    grid = tower.cfg.grid**2
    head = head if head is not None else label_head(tower)
    params = [*(tower.parameters() if train_tower else ()), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = build_scheduler(opt, OptimConfig(warmup_steps=max(1, steps // 10)), steps)
    rng = np.random.default_rng([seed, 17])
    kinds = rng.choice(len(SCENE_KINDS), size=steps * batch_size, p=[0.6, 0.2, 0.2])
    uncoloured = np.random.default_rng([seed, 19]).random(steps * batch_size) < colourless  # its own stream
    palettes = np.random.default_rng([seed, 20])
    losses = []
    tower.train(train_tower)
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        scenes = [shapes.sample_scene(rng, pairs, SCENE_KINDS[k]) for k in kinds[batch]]
        images, targets = scene_views(
            scenes, uncoloured[batch], tower.cfg.image_size, palettes, colourless_view
        )
        pixels = image_processor(images)
        with torch.set_grad_enabled(train_tower):
            features = tower.layer_features(pixels, [feature_layer])[0][:, -grid:].flatten(1)  # [B, N·D]
        logits = head(features).split([n for _, n in TARGETS], dim=-1)
        loss = sum(F.cross_entropy(z, targets[:, i], ignore_index=-100) for i, z in enumerate(logits)) / len(
            TARGETS
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses


def example_scene() -> shapes.Scene:
    """Return the scene of the README's VLM example: the word "cake" written in orange."""
    return shapes.Scene(word=shapes.TextWord(EXAMPLE_ANSWER, "orange"))


def tune_clip_tower(
    clip_folder: Path, out: Path, steps: int = TOWER_STEPS, seed: int = 0, colourless: float = 0.0,
    head: str = "global", colourless_view: str = "unnamed",
) -> Path:  # fmt: skip
    """Write the CLIP at `clip_folder` with its vision tower fine-tuned on scene labels to `out`; return `out`
    (`head`: label_head's kind; `colourless`, `colourless_view`: pretrain_tower's)."""

    clip = mmlm.load(clip_folder)
    world, _ = shapes.split_world(seed)
    torch.manual_seed(seed)
    losses = pretrain_tower(
        clip.model.visual, clip.image_processor, world, steps, seed=seed, colourless=colourless,
        head=label_head(clip.model.visual, head), colourless_view=colourless_view,
    )  # fmt: skip
    print(f"vision tower: scene-label loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} in {steps} steps")
    clip.save_pretrained(out, format="mmlm")
    return out


def evaluate_demo_vlm(loaded: Any, cfg: VLMTrainConfig, budget: VLMDemoBudget, out: Path) -> dict[str, Any]:
    """Return the demo VLM's figures: VQA on the held-out world (val, then test once), the blind and no-image
    probes, the answer prior, POPE."""
    train_world, heldout_world = shapes.split_world(cfg.seed, cfg.holdout_fraction)
    size = loaded.config.vision.image_size
    val = questions(heldout_world, "val", budget.eval_samples, cfg.seed, size)
    test = questions(heldout_world, "test", budget.eval_samples, cfg.seed, size)
    train = questions(train_world, "train", 2000, cfg.seed, size)
    figures: dict[str, Any] = {f"vqa_val_{k}": v for k, v in vqa_figures(loaded, val).items()}
    figures.update({f"vqa_{k}": v for k, v in vqa_figures(loaded, test).items()})
    for probe in ("blind", "text_only"):
        figures.update({f"vqa_{probe}_{k}": v for k, v in vqa_figures(loaded, test, probe).items()})
    figures.update({f"vqa_prior_{k}": v for k, v in answer_prior(train, test).items()})
    figures.update(pope_summary(loaded, out / "eval_data", budget.pope_samples))
    return figures


def _summary_lines(figures: dict[str, Any]) -> str:
    rows = [f"{'question type':<14}{'test':>8}{'val':>8}{'blind':>8}{'no image':>9}{'prior':>8}"]
    for t in ("all", *QUESTION_TYPES[1:]):
        key = "accuracy" if t == "all" else f"accuracy_{t}"
        cells = [
            figures.get(f"vqa_{p}{key}", float("nan")) for p in ("", "val_", "blind_", "text_only_", "prior_")
        ]
        rows.append(f"{t:<14}" + "".join(f"{c:>{9 if i == 3 else 8}.3f}" for i, c in enumerate(cells)))
    rows.append(
        f'captions ("Describe the image."): CIDEr-D {figures.get("vqa_caption_cider", float("nan")):.3f}, '
        f"exact match {figures.get('vqa_accuracy_caption', float('nan')):.3f}"
    )
    pope = "  ".join(f"{s} F1 {figures[f'pope_f1_{s}']:.3f} yes {figures[f'pope_yes_ratio_{s}']:.2f}"
                     for s in POPE_SPLITS)  # fmt: skip
    return "\n".join([*rows, f"POPE ({figures['pope_questions']} questions): {pope}"])


def run_vlm_demo(
    out: Path, clip_folder: Path | None, seed: int = 0, budget: VLMDemoBudget | None = None
) -> dict[str, Any]:
    """Train and evaluate the demo VLM; write it to <out>/vlm; return the figures summary.json gets."""
    budget = budget or VLMDemoBudget()
    start = time.perf_counter()
    tower = None
    if clip_folder is not None:
        tower = tune_clip_tower(clip_folder, out / "vlm_tower", budget.tower_steps, seed, budget.tower_colourless,
                                colourless_view=budget.tower_colourless_view)  # fmt: skip
    tower_seconds = time.perf_counter() - start
    cfg = demo_vlm_config(out, tower, budget.eval_samples, budget, seed)
    loaded, records = run_vlm_training(cfg, evaluate=lambda model, step: {})  # scored below, once
    train_seconds = time.perf_counter() - start
    figures = evaluate_demo_vlm(loaded, cfg, budget, out)
    loaded.save_pretrained(out / "vlm")
    size = loaded.config.vision.image_size
    image = shapes.render(example_scene(), size)
    image.save(out / "vlm_example.png")
    reply = loaded.generate([{"role": "user", "content": f"<image>\n{EXAMPLE_QUESTION}"}], [image])
    seconds = time.perf_counter() - start
    print(_summary_lines(figures))
    print(f"VQA accuracy {figures['vqa_accuracy']:.3f} on the questions among {budget.eval_samples} test prompts "
          f"about held-out colour×shape pairs, words and chart bars (exact match after VQA normalisation, greedy; "
          f"captions apart); blind (grey image) {figures['vqa_blind_accuracy']:.3f}, no image "
          f"{figures['vqa_text_only_accuracy']:.3f}, answer prior {figures['vqa_prior_accuracy']:.3f}")  # fmt: skip
    print(f"example: {out / 'vlm_example.png'} {EXAMPLE_QUESTION!r} -> {reply!r}  "
          f"(expected {EXAMPLE_ANSWER!r}: {exact_match(reply, EXAMPLE_ANSWER)})")  # fmt: skip
    print(f"wrote the VLM to {out / 'vlm'}  ({seconds:.1f}s: training {train_seconds:.1f}s)")
    summary: dict[str, Any] = dict(figures)
    summary.update({"vqa_questions": budget.eval_samples, "vlm_steps": cfg.total_steps, "vlm_seed": seed,
                    "vlm_tower_seconds": round(tower_seconds, 1), "vlm_final_loss": records[-1]["loss"],
                    "vlm_seconds": round(seconds, 1)})  # fmt: skip
    (out / "vlm_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def rescore_vlm_demo(out: Path) -> dict[str, Any]:
    """Score the VLM an earlier `make demo` wrote to <out>/vlm again, with this version's evaluation (its seed,
    split and question counts from <out>/vlm_train/config.json and vlm_summary.json); put the new figures in
    <out>/vlm_summary.json and <out>/summary.json in place of the old ones and return them. No training runs."""
    config_path, model_path = out / "vlm_train" / "config.json", out / "vlm"
    if not config_path.is_file() or not (model_path / "config.json").is_file():
        raise InputError(
            f"{out}: no demo VLM to score (expected {model_path} and {config_path}); run `mmlm demo`"
        )
    saved = json.loads(config_path.read_text())
    cfg = VLMTrainConfig(seed=int(saved["seed"]), holdout_fraction=float(saved["holdout_fraction"]))
    written = out / "vlm_summary.json"
    pope = json.loads(written.read_text()).get("pope_questions") if written.is_file() else None
    budget = VLMDemoBudget(
        eval_samples=int(saved["eval_samples"]), pope_samples=int(pope or VLMDemoBudget.pope_samples)
    )
    figures = evaluate_demo_vlm(mmlm.load(model_path), cfg, budget, out)
    print(_summary_lines(figures))
    for name in ("vlm_summary.json", "summary.json"):
        path = out / name
        if path.is_file():
            old = json.loads(path.read_text())
            kept = {
                k: v for k, v in old.items() if not k.startswith(("vqa_", "pope_")) or k == "vqa_questions"
            }
            path.write_text(json.dumps({**kept, **figures}, indent=2) + "\n")
    print(
        f"rescored {model_path}; updated the figures in {out / 'vlm_summary.json'} and {out / 'summary.json'}"
    )
    return figures
