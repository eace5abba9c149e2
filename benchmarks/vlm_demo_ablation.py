"""Ablations of the demo VLM (`make demo`'s recipe): what does and does not lift its VQA accuracy.

Each variant trains the demo's VLM once (about 5 minutes on 2 CPU cores) and prints the figures `make demo`
reports (mmlm.recipes.demo_vlm.evaluate_demo_vlm): VQA accuracy on the validation questions, which choose between
variants, and on the test questions, overall and per type; the blind probe; POPE. The baseline uses `make demo`'s
scene-tuned tower (runs/demo/vlm_tower).

    .venv/bin/python benchmarks/vlm_demo_ablation.py baseline
    .venv/bin/python benchmarks/vlm_demo_ablation.py lm4             # a 4-layer LM instead of 2
    .venv/bin/python benchmarks/vlm_demo_ablation.py sample_loss     # loss_average: sample
    .venv/bin/python benchmarks/vlm_demo_ablation.py no_captions     # no captions in the instruction stage
    .venv/bin/python benchmarks/vlm_demo_ablation.py pixel_shuffle   # Idefics3's connector: 9 image tokens
    .venv/bin/python benchmarks/vlm_demo_ablation.py turns5          # 5 questions per training image, not 3
    .venv/bin/python benchmarks/vlm_demo_ablation.py instruct1700    # 1,700 instruction steps, not 1,200
    .venv/bin/python benchmarks/vlm_demo_ablation.py aligned_tower   # a fresh 48 px tower, 16 px patches on the
                                                                     # 3×3 scene grid, scene-label pre-trained
    .venv/bin/python benchmarks/vlm_demo_ablation.py lookup_yesno    # a curriculum: 300 steps of colour, count,
                                                                     # text and chart, 400 of presence and
                                                                     # relation, then 500 of every type
    .venv/bin/python benchmarks/vlm_demo_ablation.py lookup_yesno_long  # the same with 200 and 500
    .venv/bin/python benchmarks/vlm_demo_ablation.py color_presence  # 300 colour, 400 presence, 500 all
    .venv/bin/python benchmarks/vlm_demo_ablation.py captions_first  # 300 steps of captions, then 900 of all
    .venv/bin/python benchmarks/vlm_demo_ablation.py lm4 --quick     # 2 steps a stage, 8 eval questions,
                                                                     # a fresh tower: checks that it runs
"""

import argparse
import json
import time
from pathlib import Path

import torch

import mmlm.train.vlm_loop as loop
from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.colours import COLOURLESS_VIEWS
from mmlm.data.synthetic.instructions import QUESTION_TYPES
from mmlm.fusion import ConnectorConfig
from mmlm.models.vision import VisionConfig
from mmlm.recipes.demo_vlm import (
    LOOKUP_TYPES,
    VLMDemoBudget,
    demo_vlm_config,
    evaluate_demo_vlm,
    pretrain_tower,
    tune_clip_tower,
)

YES_NO = ("presence", "relation")
CURRICULA = {
    "lookup_yesno": (("lookup", 300, LOOKUP_TYPES), ("yesno", 400, YES_NO)),
    "lookup_yesno_long": (("lookup", 200, LOOKUP_TYPES), ("yesno", 500, YES_NO)),
    "color_presence": (
        ("colour", 300, ("color",)),
        ("presence", 400, ("presence",)),
    ),  # the ladder's curriculum
    "captions_first": (("describe", 300, ("caption",)),),  # whole-scene descriptions first, LM trained
}
VARIANTS = (
    "baseline",
    "lm4",
    "sample_loss",
    "no_captions",
    "pixel_shuffle",
    "aligned_tower",
    "turns5",
    "instruct1700",
    *CURRICULA,
)


def config(variant: str, out: Path, tower: Path, budget: VLMDemoBudget, seed: int = 0):
    """Return the demo VLM run with one change (a curriculum variant's is in `budget`)."""
    cfg = demo_vlm_config(
        out, None if variant == "aligned_tower" else tower, budget.eval_samples, budget, seed
    )
    if variant == "lm4":
        cfg.model.lm.layers = 4
    elif variant == "turns5":
        cfg.max_length = 192  # 5 questions and answers after the 36 image tokens
    elif variant == "sample_loss":
        cfg.loss_average = "sample"
    elif variant == "no_captions":
        # captions only in the align stage: a caption's ~15 answer tokens, against 1-2 for a question, no longer
        # dominate the instruction stage's token-averaged loss
        cfg.stages["instruct"].data.question_types = list(QUESTION_TYPES[1:])
    elif variant == "pixel_shuffle":
        # each 2×2 block of the 6×6 patch grid, one 16-px cell of the scene's 3×3 grid: 9 image tokens, not 36
        cfg.model.connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=2)
    elif variant == "aligned_tower":
        cfg.model.vision = VisionConfig(image_size=48, patch_size=16, width=128, layers=4, heads=4, mlp_dim=512,
                                        act="gelu", embed_dim=None, stem="conv")  # fmt: skip
    return cfg


def shrink(cfg):
    """Return `cfg` cut to a run check: 2 steps a stage, batch 4, 8 eval questions, small sample pools."""
    for stage in cfg.stages.values():
        stage.steps = 2
        stage.vision_from_step = min(stage.vision_from_step, 1)
        stage.optim.warmup_steps = 1
        stage.data.samples, stage.data.text_samples = 64, 64
    cfg.batch_size, cfg.eval_samples = 4, 8
    return cfg


def pretrain_fresh_towers(steps: int = 300) -> None:
    """Make the run scene-label pre-train its fresh tower in place, as tune_clip_tower does for the CLIP's."""
    build = loop.build_vlm

    def build_and_pretrain(cfg, tokenizer):
        model, processor = build(cfg, tokenizer)
        pairs, _ = shapes.split_combinations(cfg.seed)
        losses = pretrain_tower(model.vision, processor.image_processor, pairs, steps)
        print(f"tower: scene-label loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} in {steps} steps")
        return model, processor

    loop.build_vlm = build_and_pretrain


def main() -> None:
    """Train one variant and print its VQA figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--tower", default="runs/demo/vlm_tower", help="make demo's scene-tuned CLIP tower")
    parser.add_argument(
        "--clip", help="a make demo CLIP (runs/demo/model): tune its tower first, in place of --tower"
    )
    parser.add_argument(
        "--tower-colourless",
        type=float,
        default=VLMDemoBudget.tower_colourless,
        help="with --clip: share of scene-label images without their named colours in the tower's tuning",
    )
    parser.add_argument("--tower-colourless-view", choices=COLOURLESS_VIEWS,
                        default=VLMDemoBudget.tower_colourless_view,
                        help="with --clip: those images in random unnamed colours or in greyscale")  # fmt: skip
    parser.add_argument("--tower-head", choices=["global", "cell"], default="global",
                        help="with --clip: the tuning's label head (mmlm.recipes.demo_vlm.label_head)")  # fmt: skip
    parser.add_argument(
        "--tower-steps", type=int, default=VLMDemoBudget.tower_steps, help="with --clip: tuning steps"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the world's split and the run's seed (match the tower's)"
    )
    parser.add_argument(
        "--instruct-steps", type=int, help="instruction steps (default: the demo's, or the variant's)"
    )
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps, a fresh tower: a check that it runs"
    )
    args = parser.parse_args()
    out = Path(args.out) / args.variant
    if args.variant == "aligned_tower":
        pretrain_fresh_towers(2 if args.quick else 300)
    start = time.perf_counter()
    sizes = {"eval_samples": 8, "pope_samples": 12} if args.quick else {}
    changed = {"turns5": {"turns": 5}, "instruct1700": {"instruct_steps": 1700}}.get(args.variant, {})
    if args.instruct_steps:
        changed["instruct_steps"] = args.instruct_steps
    budget = VLMDemoBudget(curriculum=CURRICULA.get(args.variant, ()), **sizes, **changed)
    tower = Path(args.tower)
    if args.clip:
        tower = tune_clip_tower(
            Path(args.clip),
            out / "vlm_tower",
            args.tower_steps,
            args.seed,
            args.tower_colourless,
            args.tower_head,
            args.tower_colourless_view,
        )
    cfg = config(args.variant, out, tower, budget, args.seed)
    if args.quick:
        cfg.model.vision_init = None  # make demo's tower is not needed to check the run
        cfg = shrink(cfg)
    loaded, _ = loop.run_vlm_training(cfg, evaluate=lambda model, step: {})  # scored below, once
    figures = {k: round(v, 3) if isinstance(v, float) else v
               for k, v in evaluate_demo_vlm(loaded, cfg, budget, out).items()}  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"variant": args.variant, "seed": args.seed, "instruct_steps": budget.instruct_steps,
                      "clip": args.clip, "tower_steps": args.tower_steps, "tower_head": args.tower_head, "tower_colourless": args.tower_colourless,
                      "tower_colourless_view": args.tower_colourless_view,
                      "seconds": seconds, **figures}))  # fmt: skip


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
