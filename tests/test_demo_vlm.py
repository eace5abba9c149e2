"""The VLM half of `make demo`: honest splits, the diagnosis ladder, and the whole path at toy sizes."""

import json

import numpy as np
import pytest
import torch

from mmlm.cli import main
from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.instructions import conversation_turns, make_instruction, plural, text_corpus
from mmlm.data.synthetic.world import split_bars, split_words
from mmlm.errors import InputError
from mmlm.recipes.demo_ladder import (
    SLOT_FEATURES,
    SLOTS,
    LadderConfig,
    ladder_data,
    ladder_table,
    oracle_slots,
    run_ladder,
)
from mmlm.recipes.demo_vlm import (
    COLOUR_TARGETS,
    TARGETS,
    CellHead,
    VLMDemoBudget,
    cell_accuracy,
    run_vlm_demo,
    scene_targets,
    scene_views,
)
from mmlm.recipes.demo_vlm_eval import answer_prior, vqa_figures
from mmlm.train.mixing import corpus_texts
from mmlm.train.vlm_config import StageData, vlm_config_from_dict


def test_word_and_bar_splits_are_disjoint_cover_everything_and_depend_on_the_seed():
    train, heldout = split_words(0)
    assert len(heldout) == 6 and not set(train) & set(heldout) and len(train) + len(heldout) == 24
    assert split_words(1) != (train, heldout)
    train_bars, heldout_bars = split_bars(0)
    assert len(heldout_bars) == 18 and not set(train_bars) & set(heldout_bars)
    for side in (train_bars, heldout_bars):  # every colour and every height keeps bars on both sides
        assert {c for c, _ in side} == set(shapes.COLORS) and {h for _, h in side} == set(range(1, 10))


def _bars(scene):
    return set(zip(scene.chart.labels, scene.chart.heights, strict=True)) if scene.chart else set()


def test_no_held_out_pair_word_or_bar_reaches_training_and_the_test_asks_only_about_them():
    train, heldout = shapes.split_world(0)
    samples = [make_instruction(i, 0, pairs=train) for i in range(300)]
    assert all(s.scene.pairs() <= set(train.pairs) and _bars(s.scene) <= set(train.bars) for s in samples)
    assert all(s.scene.word.word in train.words for s in samples if s.scene.word)
    test = [make_instruction(i, 0, split="test", pairs=heldout) for i in range(300)]
    assert all(s.scene.pairs() <= set(heldout.pairs) and _bars(s.scene) <= set(heldout.bars) for s in test)
    assert {s.scene.word.word for s in test if s.scene.word} <= set(heldout.words)
    # the LM's text corpus and the tokenizer's text (which includes the instruction stream) name none of them
    texts = text_corpus(500, 0, pairs=train) + corpus_texts([StageData(text_source="shapes",
                                                                       multimodal_fraction=0.5)], 0, train, 300)  # fmt: skip
    unseen = [f"{c} {s}" for c, s in heldout.pairs] + [f'"{w}"' for w in heldout.words]
    assert not [t for t in texts for name in unseen if name in t]


def test_val_and_test_are_separate_streams():
    _, heldout = shapes.split_world(0)
    val = [make_instruction(i, 0, split="val", pairs=heldout).question for i in range(20)]
    test = [make_instruction(i, 0, split="test", pairs=heldout).question for i in range(20)]
    assert val != test


def test_answer_prior_is_the_most_common_training_answer_per_type():
    make = lambda t, a: type("I", (), {"type": t, "answer": a})()  # noqa: E731
    train = [make("presence", "yes")] * 3 + [make("presence", "no"), make("count", "2")]
    test = [make("presence", "yes"), make("presence", "no"), make("count", "3")]
    prior = answer_prior(train, test + [make("caption", "a red star.")])
    assert prior["accuracy_presence"] == 0.5 and prior["accuracy_count"] == 0.0
    assert prior["accuracy"] == pytest.approx(1 / 3) and "accuracy_caption" not in prior  # captions aside


class ScriptedVLM:
    """Answers as a test wants: right with the image (captions a word short), "no" without one (in order)."""

    def __init__(self, samples):
        self.samples, self.asked = samples, 0
        self.model = torch.nn.Identity()
        self.config = type("C", (), {"vision": type("V", (), {"image_size": 32})()})()
        self.prompts = []

    def generate(self, prompts, images, max_new_tokens):
        self.prompts += prompts
        batch = [self.samples[(self.asked + i) % len(self.samples)] for i in range(len(prompts))]
        self.asked += len(prompts)
        if images is None:
            return ["no" for _ in batch]
        return [s.answer.rsplit(" ", 1)[0] if s.type == "caption" else s.answer for s in batch]


def test_vqa_figures_score_questions_and_captions_apart_and_the_no_image_probe_has_no_image():
    samples = [make_instruction(i, 0, split="test") for i in range(40)]
    described = sum(s.type == "caption" for s in samples)
    assert 0 < described < len(samples)
    model = ScriptedVLM(samples)
    figures = vqa_figures(model, samples)
    assert figures["accuracy"] == 1.0 and figures["accuracy_caption"] == 0.0  # captions are not in "accuracy"
    assert figures["accuracy_with_captions"] == pytest.approx(1 - described / len(samples))
    assert 0 < figures["caption_cider"] < 10
    model.prompts.clear()
    no_image = vqa_figures(model, samples, "text_only")
    assert all("<image>" not in p[0]["content"] for p in model.prompts)
    asked = [s for s in samples if s.type != "caption"]
    assert no_image["accuracy"] == pytest.approx(sum(s.answer == "no" for s in asked) / len(asked))


def test_oracle_slots_are_one_hot_per_cell_word_and_bar():
    scene = shapes.Scene((shapes.ShapeObject("star", "red", "small", 0.18, 0.18),))
    slots = oracle_slots(scene)
    assert slots.shape == (SLOTS, SLOT_FEATURES)
    assert slots[0].sum() == 4 and slots[1].sum() == 2  # kind + shape + colour + size; kind + "empty"
    word = oracle_slots(shapes.Scene(word=shapes.TextWord("cake", "orange")))
    assert not np.array_equal(
        word[9].numpy(), oracle_slots(shapes.Scene(word=shapes.TextWord("dog", "orange")))[9].numpy()
    )


def test_the_ladder_trains_each_rung_and_tabulates_it():
    rows = run_ladder(LadderConfig(steps=2, batch_size=4, val_samples=12, width=32, image_size=32))
    assert [r["rung"] for r in rows] == ["text", "oracle", "tower"]
    assert all(0 <= r["all"] <= 1 and r["first_loss"] > 0 for r in rows)
    assert ladder_table(rows).splitlines()[2].startswith("| text |")


def test_bad_ladder_input_is_one_line(capsys):
    assert main(["study", "ladder", "--rungs", "text,pixels"]) == 2
    err = capsys.readouterr().err
    assert "--rungs" in err and "\n" not in err.strip()
    for args, flag in (
        (["--types", "presence,smell"], "--types"),
        (["--first-types", "color"], "--first-steps"),
    ):
        assert main(["study", "ladder", *args]) == 2
        err = capsys.readouterr().err
        assert flag in err and "\n" not in err.strip()


@pytest.mark.slow
def test_the_whole_vlm_demo_runs_at_toy_size_and_writes_its_figures(tmp_path):
    budget = VLMDemoBudget(tower_steps=1, pretrain_steps=1, align_steps=1, instruct_steps=3, eval_samples=8,
                           pope_samples=12, batch_size=4)  # fmt: skip
    summary = run_vlm_demo(tmp_path, None, seed=1, budget=budget)
    written = json.loads((tmp_path / "vlm_summary.json").read_text())
    assert written == summary and summary["vlm_seed"] == 1 and summary["vlm_steps"] == 5
    for key in ("vqa_accuracy", "vqa_val_accuracy", "vqa_blind_accuracy", "vqa_text_only_accuracy", "vqa_prior_accuracy",
                "pope_f1_random", "pope_f1_popular", "pope_f1_adversarial", "pope_yes_ratio_adversarial"):  # fmt: skip
        assert 0 <= summary[key] <= 1, key
    assert summary["pope_questions"] == 12 and (tmp_path / "vlm" / "config.json").is_file()


def test_follow_up_questions_are_distinct_and_true_of_the_same_scene():
    sample = make_instruction(3, 0, type_weights={"count": 1.0})
    turns = conversation_turns(sample, 4, 0, 3, shapes.all_pairs())
    assert turns[0] == (sample.question, sample.answer) and len({q for q, _ in turns}) == len(turns) >= 3
    for question, answer in turns:
        if question.startswith("How many "):
            shape = next(s for s in shapes.SHAPES if plural(s) in question)
            assert answer == str(sample.scene.count(shape=shape))
    assert conversation_turns(sample, 1, 0, 3, shapes.all_pairs()) == turns[:1]


def test_a_stages_question_types_hold_for_every_follow_up_question():
    sample = make_instruction(3, 0, type_weights={"count": 1.0})
    turns = conversation_turns(sample, 4, 0, 3, shapes.all_pairs(), ["count", "color"])
    assert len(turns) >= 2 and all(q.startswith(("How many ", "What color ")) for q, _ in turns)
    only_first = conversation_turns(sample, 4, 0, 3, shapes.all_pairs(), ["count", "text"])
    assert all(q.startswith("How many ") for q, _ in only_first)
    assert conversation_turns(sample, 4, 0, 3, shapes.all_pairs(), ["text"]) == turns[:1]


def test_the_ladders_curriculum_trains_its_first_types_first_and_scores_the_others():
    cfg = LadderConfig(steps=2, batch_size=4, val_samples=8, width=32, types=("presence",), first_types=("color",),
                       first_steps=1, turns=2)  # fmt: skip
    train, val, _ = ladder_data(cfg, cfg.steps * cfg.batch_size)
    assert (
        len(train) == 12
        and {s.type for s in train[:4]} == {"color"}
        and {s.type for s in train[4:]} == {"presence"}
    )
    assert all(q.startswith("What color") for s in train[:4] for q, _ in s.turns)
    assert {s.type for s in val} == {"presence"}
    (row,) = run_ladder(cfg, ("oracle",))
    assert set(row) >= {"presence", "all"} and "color" not in row


def test_a_stage_asks_at_least_one_question_per_image():
    with pytest.raises(InputError, match="stages.instruct.data.turns: expected a positive integer"):
        vlm_config_from_dict({"stages": {"instruct": {"data": {"turns": 0}}}})


@pytest.mark.parametrize("view", ["unnamed", "greyscale"])
def test_a_colourless_scene_view_shows_no_named_colour_and_asks_for_none(view):
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, shapes.all_pairs(), kind) for kind in ("objects", "objects", "chart")]
    without = np.array([True, False, True])
    images, targets = scene_views(scenes, without, 32, np.random.default_rng(1), view)
    coloured = [TARGETS[i][0] for i in range(len(TARGETS)) if COLOUR_TARGETS[i]]
    assert coloured and all("color" in name for name in coloured)
    named = {tuple(c) for c in shapes.COLORS.values()}
    for image, scene, is_without in zip(images, scenes, without, strict=True):
        pixels = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
        assert (
            bool(pixels & named) != is_without
        )  # shapes and bars are painted in named colours only when kept
        if is_without and view == "greyscale":
            assert all(len(set(p)) == 1 for p in pixels)
        if not is_without:
            assert image.tobytes() == shapes.render(scene, 32).tobytes()
    assert (targets[0, COLOUR_TARGETS] == -100).all() and (targets[2, COLOUR_TARGETS] == -100).all()
    assert (targets[1, COLOUR_TARGETS][:9] >= 0).all()  # the coloured view keeps its 9 cells' colour targets
    assert torch.equal(targets[0, ~COLOUR_TARGETS], torch.tensor(scene_targets(scenes[0]))[~COLOUR_TARGETS])


class StubTower(torch.nn.Module):
    """A 'tower' whose patch tokens are zeros: the heads below decide every answer."""

    cfg = type("Cfg", (), {"grid": 2, "width": 1, "image_size": 16})()

    def layer_features(self, pixels, layers):
        return [torch.zeros(len(pixels), 4, 1)]


def test_cell_accuracy_scores_only_occupied_cells():
    world, _ = shapes.split_world(0)
    rng = np.random.default_rng([0, 23])  # cell_accuracy's scenes for seed 0
    targets = torch.tensor([scene_targets(shapes.sample_scene(rng, world, "objects")) for _ in range(20)])
    widths = [n for _, n in TARGETS]
    right = torch.cat(
        [
            torch.nn.functional.one_hot(t.clamp(min=0), n).float()
            for t, n in zip(targets.T, widths, strict=True)
        ],
        -1,
    )
    empty = torch.cat(
        [torch.nn.functional.one_hot(torch.zeros(20, dtype=torch.long), n).float() for n in widths], -1
    )
    processor = lambda images: images  # noqa: E731
    for head, expected in ((lambda _: right, 1.0), (lambda _: empty, 0.0)):
        figures = cell_accuracy(StubTower(), head, processor, world, samples=20, seed=0)
        assert figures == {"shape": expected, "color": expected, "size": expected}


def test_the_cell_head_reads_each_cells_shape_from_that_cells_patches_alone():
    head = CellHead(grid=6, width=4)
    features = torch.randn(2, 6, 6, 4)
    logits = head(features.flatten(1))
    assert logits.shape == (2, sum(n for _, n in TARGETS))
    moved = features.clone()
    moved[:, 0:2, 2:4] += 1.0  # the patches over the top-middle cell (row 0, column 1)
    changed = (head(moved.flatten(1)) - logits).abs().sum(0) > 0
    names = [name for name, n in TARGETS for _ in range(n)]
    cell_names = {n for n in names if n[:-1] in ("shape", "color", "size")}
    assert {n for n, c in zip(names, changed.tolist(), strict=True) if c and n in cell_names} == {
        "shape1",
        "color1",
        "size1",
    }
    with pytest.raises(InputError, match="3×3"):
        CellHead(grid=4, width=4)
