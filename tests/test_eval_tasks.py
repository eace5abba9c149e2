"""Evaluation tasks: samples files (round trips, bad rows), task files, the built-in shapes tasks and the
converters from public benchmarks' own files (tiny fixtures written here in each official schema)."""

import base64
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmlm.data.synthetic.instructions import make_instruction
from mmlm.data.synthetic.shapes import COLORS, SHAPES, describe, split_combinations
from mmlm.errors import InputError
from mmlm.eval import official_formats
from mmlm.eval.official_formats import convert, official_task
from mmlm.eval.tasks import (
    BUILTIN_TASKS,
    Sample,
    Task,
    load_task,
    read_samples,
    write_samples,
    write_shapes_task,
)

TRAIN_PAIRS, HELDOUT_PAIRS = split_combinations(0)


def _png(path: Path | None = None, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def builtins(tmp_path_factory):
    """Every built-in task, generated once into a temporary cache."""
    cache = tmp_path_factory.mktemp("eval_data")
    return cache, {name: load_task(name, cache_dir=cache) for name in BUILTIN_TASKS}


# ---- samples files ----


def test_jsonl_round_trip_keeps_every_field_and_stores_local_images_relative(tmp_path):
    _png(tmp_path / "data" / "images" / "a.png")
    inline = "data:image/png;base64," + base64.b64encode(_png()).decode()
    samples = [
        Sample(
            "q1", "What color?", str(tmp_path / "data" / "images" / "a.png"), ["red", "red"], type="color"
        ),
        Sample("q2", "Which one?", inline, ["blue"], ["red", "blue"], "B", "mc", {"objects": ["red circle"]}),
        Sample("q3", "No image here.", answers=["x"]),
    ]
    path = write_samples(samples, tmp_path / "data" / "samples.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["image"] == "images/a.png"
    assert read_samples(path) == samples
    assert read_samples(path, limit=2) == samples[:2]


def test_tsv_reads_json_and_bar_separated_answers_choices_and_extra_columns(tmp_path):
    _png(tmp_path / "img.png")
    rows = [
        "id\tquestion\timage\tanswers\tchoices\tlabel\ttype\tsource",
        'a\tHow many?\timg.png\t["2", "two"]\t\t\tcount\tsynthetic',
        'b\tPick one\t\tyes|yeah\t["cat", "dog", "cow"]\tC\tmc\t',
    ]
    path = tmp_path / "set.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert read_samples(path) == [
        Sample(
            "a",
            "How many?",
            str(tmp_path / "img.png"),
            ["2", "two"],
            type="count",
            meta={"source": "synthetic"},
        ),
        Sample("b", "Pick one", None, ["yes", "yeah"], ["cat", "dog", "cow"], "C", "mc"),
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "question": "q"}', '{"id": "b", "question": '], r"samples\.jsonl:2: invalid JSON"),
        (
            ['{"id": "a", "question": "q", "answer": "x"}'],
            r"samples\.jsonl:1: unknown field\(s\) \['answer'\]",
        ),
        (["", '{"id": "a"}'], r"samples\.jsonl:2: missing field 'question'"),
        (['{"id": "a", "question": "q", "answers": "red"}'], r"samples\.jsonl:1: answers: expected a list"),
        (
            ['{"id": "a", "question": "q", "choices": ["x", "y"], "label": "C"}'],
            r":1: label: expected a letter A-B",
        ),
        (
            ['{"id": "a", "question": "q", "image": "missing.png"}'],
            r":1: image file .*missing\.png not found",
        ),
        (['{"id": "a", "question": "q"}', '{"id": "a", "question": "r"}'], r":2: id 'a' repeats line 1"),
        (["[1, 2]"], r"samples\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_rows_name_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_samples(path)


def test_bad_tsv_rows_and_files_name_the_problem(tmp_path):
    path = tmp_path / "set.tsv"
    path.write_text("id\tquestion\tanswers\na\tq\tred\nb\tq\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"set\.tsv:3: expected 3 tab-separated cells, got 2"):
        read_samples(path)
    path.write_text('id\tquestion\tchoices\na\tq\t["x", \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"set\.tsv:2: choices: expected JSON"):
        read_samples(path)
    path.write_text("question\tanswers\nq\tred\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"set\.tsv:1: header lacks column\(s\) \['id'\]"):
        read_samples(path)
    with pytest.raises(InputError, match=r"samples file not found"):
        read_samples(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match=r"expected a samples file ending in \.jsonl or \.tsv"):
        read_samples(_write(tmp_path / "set.csv", []))


# ---- tasks ----


def test_render_prompt_fills_question_and_lettered_choices():
    task = Task(
        "t", "d.jsonl", "{question}\n{choices}\nAnswer with the letter.", "option_letter", "multiple_choice"
    )
    sample = Sample("1", "What color is the {choices} square?", choices=["red", "blue", "green"])
    assert task.render_prompt(sample) == (
        "What color is the {choices} square?\nA. red\nB. blue\nC. green\nAnswer with the letter."
    )
    with pytest.raises(InputError, match=r"uses \{choices\} but sample '2' has none"):
        task.render_prompt(Sample("2", "q"))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_task_files_load_with_data_relative_to_the_file(tmp_path, suffix):
    _png(tmp_path / "sets" / "img" / "1.png")
    write_samples([Sample("1", "What is it?", "img/1.png", ["cat"])], tmp_path / "sets" / "animals.jsonl")
    fields = {"data": "../sets/animals.jsonl", "prompt": "{question} Answer briefly.", "parser": "vqa",
              "metric": "exact_match", "max_new_tokens": 8}  # fmt: skip
    (tmp_path / "tasks").mkdir()
    spec = tmp_path / "tasks" / f"animals{suffix}"
    spec.write_text(yaml.safe_dump(fields) if suffix == ".yaml" else json.dumps(fields), encoding="utf-8")
    task, samples = load_task(str(spec))
    assert task == Task(
        "animals", str(tmp_path / "sets" / "animals.jsonl"), fields["prompt"], "vqa", "exact_match", 8
    )
    assert samples[0].image == str(tmp_path / "sets" / "img" / "1.png")
    assert task.render_prompt(samples[0]) == "What is it? Answer briefly."


def test_bad_task_specs_are_input_errors(tmp_path):
    with pytest.raises(
        InputError, match=r"unknown task 'shapes-vqa2': expected a built-in task \(shapes-vqa, "
    ):
        load_task("shapes-vqa2")
    with pytest.raises(InputError, match=r"task file not found"):
        load_task(str(tmp_path / "nothing.yaml"))
    spec = _write(
        tmp_path / "t.json", {"data": "d.jsonl", "prompt": "{question}", "parser": "vqa", "metrics": "x"}
    )
    with pytest.raises(InputError, match=r"t\.json: unknown field\(s\) \['metrics'\]"):
        load_task(str(spec))
    spec = _write(
        tmp_path / "t.json", {"data": "d.jsonl", "prompt": "Describe.", "parser": "vqa", "metric": "x"}
    )
    with pytest.raises(InputError, match=r"t\.json: prompt: expected a template containing \{question\}"):
        load_task(str(spec))
    (tmp_path / "t.yaml").write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"t\.yaml: invalid YAML"):
        load_task(str(tmp_path / "t.yaml"))
    with pytest.raises(InputError, match=r"limit: expected a positive number"):
        load_task("shapes-ocr", limit=0, cache_dir=tmp_path)


# ---- built-in shapes tasks ----


def test_builtin_tasks_are_deterministic_and_cached(builtins, tmp_path):
    cache, _ = builtins
    for name in ("shapes-pope", "shapes-mc"):
        again = write_shapes_task(name, tmp_path / name)
        assert again.read_bytes() == (cache / name / "samples.jsonl").read_bytes()
        for image in sorted((tmp_path / name / "images").iterdir())[:5]:
            assert image.read_bytes() == (cache / name / "images" / image.name).read_bytes()
    stamp = (tmp_path / "shapes-mc" / "samples.jsonl").stat().st_mtime_ns
    write_shapes_task("shapes-mc", tmp_path / "shapes-mc")
    assert (tmp_path / "shapes-mc" / "samples.jsonl").stat().st_mtime_ns == stamp


def test_builtin_tasks_have_their_sizes_and_loadable_images_of_unseen_train_pair_scenes(builtins):
    cache, loaded = builtins
    for name, (task, samples) in loaded.items():
        assert task.name == name and task.data == str(cache / name / "samples.jsonl")
        assert len(samples) == 200 and len({s.id for s in samples}) == 200
        for sample in samples[:: len(samples) // 8]:
            with Image.open(sample.image) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
        for sample in samples:
            assert {tuple(o.split()) for o in sample.meta["objects"]} <= set(TRAIN_PAIRS), name
    _, limited = load_task("shapes-vqa", limit=7, cache_dir=cache)
    assert limited == loaded["shapes-vqa"][1][:7]


def test_short_answer_tasks_are_the_instruction_data_test_split(builtins):
    _, loaded = builtins
    expected_types = {"shapes-vqa": {"count", "color", "relation", "presence", "text", "chart"},
                      "shapes-count": {"count"}, "shapes-spatial": {"relation"}, "shapes-ocr": {"text"},
                      "shapes-chart": {"chart"}}  # fmt: skip
    for name, types in expected_types.items():
        task, samples = loaded[name]
        assert task.prompt == "{question}" and {s.type for s in samples} == types
        for i in (0, 57, 199):
            item = make_instruction(i, 0, split="test", pairs=TRAIN_PAIRS, image_size=32,
                                    type_weights=dict.fromkeys(types, 1.0))  # fmt: skip
            assert (samples[i].question, samples[i].answers) == (item.question, [item.answer])
            with Image.open(samples[i].image) as image:
                assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(item.image))


def test_pope_is_balanced_and_each_split_samples_negatives_by_its_rule(builtins):
    _, loaded = builtins
    task, samples = loaded["shapes-pope"]
    assert (task.parser, task.metric) == ("yes_no", "pope")
    assert Counter(s.label for s in samples) == {"yes": 100, "no": 100}
    assert Counter(s.label for s in samples[:50]) == {"yes": 25, "no": 25}
    question = re.compile(rf"Is there a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) in the image\?")
    objects = {s.meta["image_id"]: {tuple(o.split()) for o in s.meta["objects"]} for s in samples}
    shown = Counter(pair for present in objects.values() for pair in present)
    negatives = Counter()
    for sample in samples:
        split, present = sample.meta["pope_split"], objects[sample.meta["image_id"]]
        assert sample.type == split and sample.answers == [sample.label]
        pair = question.fullmatch(sample.question).groups()
        assert (pair in present) == (sample.label == "yes")
        if sample.label == "no":
            negatives[split] += 1
            assert pair in TRAIN_PAIRS
            if split == "popular":  # no absent pair is shown in more images
                assert all(shown[pair] >= shown[p] for p in TRAIN_PAIRS if p not in present)
            if split == "adversarial":  # a near miss: a present colour or shape
                assert any(pair[0] == color or pair[1] == shape for color, shape in present)
    assert min(negatives.values()) >= 33
    # the three splits ask about the same images and the same present objects
    by_image = {}
    for s in samples:
        if s.label == "yes":
            by_image.setdefault(s.meta["image_id"], set()).add(s.question)
    assert all(len(questions) == 1 for questions in by_image.values())


def test_multiple_choice_has_four_colours_and_balanced_letters(builtins):
    _, loaded = builtins
    task, samples = loaded["shapes-mc"]
    assert Counter(s.label for s in samples) == dict.fromkeys("ABCD", 50)
    for sample in samples:
        assert re.fullmatch(r"What color is the \w+\?", sample.question)
        assert len(set(sample.choices)) == 4 and set(sample.choices) <= set(COLORS)
        assert sample.choices["ABCD".index(sample.label)] == sample.answers[0]
    assert task.render_prompt(samples[0]).splitlines()[1:5] == [
        f"{letter}. {choice}" for letter, choice in zip("ABCD", samples[0].choices, strict=True)
    ]


def test_caption_references_start_with_the_trained_description(builtins):
    _, loaded = builtins
    task, samples = loaded["shapes-caption"]
    assert (task.parser, task.metric) == ("caption", "caption")
    for i in (0, 1, 99):
        item = make_instruction(
            i, 0, split="test", pairs=TRAIN_PAIRS, image_size=32, type_weights={"caption": 1}
        )
        assert samples[i].answers[0] == describe(item.scene) == item.answer
        assert samples[i].meta["objects"] == sorted(f"{c} {s}" for c, s in item.scene.pairs())
    assert all(2 <= len(s.answers) == len(set(s.answers)) <= 3 for s in samples)


# ---- official formats ----


def test_vqav2_keeps_the_ten_answers_and_coco_file_names(tmp_path):
    questions = _write(tmp_path / "q.json", {"questions": [
        {"image_id": 42, "question": "What is the man holding?", "question_id": 420}]})  # fmt: skip
    answers = [{"answer": "bat", "answer_confidence": "yes", "answer_id": k + 1} for k in range(9)]
    annotations = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": [*answers, {"answer": "racket", "answer_id": 10}],
         "question_type": "what is the man", "answer_type": "other", "multiple_choice_answer": "bat"}]})  # fmt: skip
    (sample,) = official_formats.vqav2(questions, annotations, tmp_path / "val2014")
    assert sample.id == "420" and sample.answers == ["bat"] * 9 + ["racket"] and sample.type == "other"
    assert sample.image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert sample.meta == {"question_id": 420, "image_id": 42, "question_type": "what is the man",
                           "multiple_choice_answer": "bat"}  # fmt: skip
    assert official_formats.vqav2(questions, None, tmp_path)[0].answers == []
    with pytest.raises(InputError, match=r"a\.json: no annotation for question_id 420"):
        official_formats.vqav2(questions, _write(tmp_path / "a.json", {"annotations": []}), tmp_path)


def test_gqa_textvqa_docvqa_and_chartqa_converters(tmp_path):
    gqa = _write(tmp_path / "testdev_balanced_questions.json", {"20968": {
        "imageId": "n161313", "question": "Is it cloudy?", "answer": "no", "fullAnswer": "No, it is clear.",
        "types": {"structural": "verify", "semantic": "attr", "detailed": "weatherVerify"}, "isBalanced": True}})  # fmt: skip
    (sample,) = official_formats.gqa(gqa, tmp_path / "images")
    assert (sample.id, sample.answers, sample.type) == ("20968", ["no"], "verify")
    assert (
        sample.image == str(tmp_path / "images" / "n161313.jpg")
        and sample.meta["full_answer"] == "No, it is clear."
    )

    textvqa = _write(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
         "answers": ["nokia"] * 7 + ["toshiba"] * 3, "image_classes": ["Phone"]}]})  # fmt: skip
    (sample,) = official_formats.textvqa(textvqa, tmp_path / "train_images")
    assert sample.id == "34602" and len(sample.answers) == 10
    assert sample.image == str(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")

    docvqa = _write(tmp_path / "val_v1.0.json", {"dataset_name": "docvqa", "data": [
        {"questionId": 49153, "question": "What is the ‘actual’ value?", "image": "documents/pxhx0227_8.png",
         "docId": 14465, "answers": ["0.28", "0.28 per share"], "question_types": ["figure/diagram"]}]})  # fmt: skip
    (sample,) = official_formats.docvqa(docvqa, tmp_path / "val")
    assert sample.answers == ["0.28", "0.28 per share"] and sample.meta["question_types"] == [
        "figure/diagram"
    ]
    assert sample.image == str(tmp_path / "val" / "documents" / "pxhx0227_8.png")

    chartqa = _write(tmp_path / "test_human.json", [{"imgname": "41699051005347.png", "query": "How many bars?",
                                                     "label": "4"}])  # fmt: skip
    (sample,) = official_formats.chartqa(chartqa, tmp_path / "png")
    assert (sample.question, sample.answers, sample.type) == ("How many bars?", ["4"], "test_human")
    with pytest.raises(InputError, match=r"test_human\.json: \[0\]: missing field 'label'"):
        official_formats.chartqa(
            _write(tmp_path / "test_human.json", [{"imgname": "a.png", "query": "q"}]), tmp_path
        )


def test_pope_and_coco_captions_converters(tmp_path):
    lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
              "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
              "label": "no"}]  # fmt: skip
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    samples = official_formats.pope(path, tmp_path / "val2014")
    assert [(s.label, s.type, s.meta["pope_split"]) for s in samples] == [("yes", "adversarial", "adversarial"),
                                                                         ("no", "adversarial", "adversarial")]  # fmt: skip
    assert samples[1].question == "Is there a dog in the image?" and samples[1].answers == ["no"]
    path.write_text(json.dumps({**lines[0], "label": "maybe"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"coco_pope_adversarial\.json:1: label: expected yes or no"):
        official_formats.pope(path, tmp_path)

    captions = _write(tmp_path / "captions_val2014.json", {
        "images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640},
                   {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640}],
        "annotations": [{"image_id": 522418, "id": 1, "caption": "A woman cutting a cake. "},
                        {"image_id": 391895, "id": 2, "caption": "A man riding a bike."},
                        {"image_id": 522418, "id": 3, "caption": "Someone slicing cake."}]})  # fmt: skip
    samples = official_formats.coco_captions(captions, tmp_path / "val2014")
    assert [(s.id, s.answers) for s in samples] == [
        ("391895", ["A man riding a bike."]), ("522418", ["A woman cutting a cake.", "Someone slicing cake."])]  # fmt: skip
    assert samples[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")


def test_multiple_choice_tsv_with_hints_base64_images_and_image_references(tmp_path):
    image = base64.b64encode(_png()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"],
            ["0", "What is shown?", "Look closely.", "a cat", "a dog", "a cow", "", "B", "object", image, "percept"],
            ["1", "Which colour?", "", "red", "green", "blue", "pink", "D", "attribute", "0", "percept"]]  # fmt: skip
    path = tmp_path / "MMBench_DEV_EN.tsv"
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    first, second = official_formats.multiple_choice(path)
    assert first == Sample("0", "Look closely.\nWhat is shown?", image, ["a dog"], ["a cat", "a dog", "a cow"], "B",
                           "object", {"l2-category": "percept"})  # fmt: skip
    assert (
        second.image == image and second.choices == ["red", "green", "blue", "pink"] and second.label == "D"
    )
    task, samples = load_task(str(convert("multiple_choice", tmp_path / "mmbench", path=path)))
    assert samples == [first, second] and (task.parser, task.metric) == ("option_letter", "multiple_choice")
    assert task.render_prompt(first).startswith(
        "Look closely.\nWhat is shown?\nA. a cat\nB. a dog\nC. a cow\nAnswer"
    )
    rows[2][7] = "E"
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(InputError, match=r"MMBench_DEV_EN\.tsv:3: answer: expected a letter A-D, got 'E'"):
        official_formats.multiple_choice(path)


def test_convert_writes_a_task_folder_that_loads_like_any_task_file(tmp_path):
    _png(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg")
    questions = _write(tmp_path / "v2_questions.json", {"questions": [
        {"image_id": 7, "question": "Is it day?", "question_id": 70}]})  # fmt: skip
    annotations = _write(tmp_path / "v2_annotations.json", {"annotations": [
        {"question_id": 70, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no"}]})  # fmt: skip
    paths = {"questions_json": questions, "annotations_json": annotations, "image_dir": tmp_path / "val2014"}
    task_file = convert("vqav2", tmp_path / "out" / "vqav2-mini", **paths)
    task, samples = load_task(str(task_file.parent))
    assert (task.name, task.parser, task.metric) == ("vqav2-mini", "vqa", "vqa_accuracy")
    assert task.render_prompt(samples[0]) == "Is it day?\nAnswer the question using a single word or phrase."
    assert samples[0].answers == ["yes"] * 10 and Path(samples[0].image).is_file()
    cached = official_task("vqav2", cache_dir=tmp_path / "cache", **paths)
    assert (
        cached.name == "vqav2-v2_questions" and Path(cached.data).parent == tmp_path / "cache" / cached.name
    )
    with pytest.raises(InputError, match=r"unknown format 'vqa3': expected one of vqav2, gqa"):
        convert("vqa3", tmp_path / "x")
    with pytest.raises(InputError, match=r"vqav2: expected the arguments questions_json, annotations_json"):
        convert("vqav2", tmp_path / "x", questions=questions)
