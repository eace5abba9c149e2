"""Shapes-world instruction data and the LLaVA conversations reader: truth, balance, splits, files, errors."""

import json
import re

import numpy as np
import pytest

from mmlm.data.conversations import ConversationDataset, read_conversations
from mmlm.data.synthetic.instructions import (
    QUESTION_TYPES,
    generate_instructions,
    instruction_splits,
    make_instruction,
    plural,
    text_corpus,
    write_instruction_splits,
    write_instructions,
    write_text_corpus,
)
from mmlm.data.synthetic.shapes import COLORS, SHAPES, relation_holds, split_combinations
from mmlm.errors import InputError

PAIR_RE = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def _objects_named(scene, color, shape):
    return [o for o in scene.objects if o.color == color and o.shape == shape]


def _check_answer(sample) -> None:
    scene, question, answer = sample.scene, sample.question, sample.answer
    if sample.type == "count":
        shape = next(s for s in SHAPES if f" {plural(s)} " in question)
        assert answer == str(scene.count(shape=shape))
    elif sample.type == "color":
        shape = re.fullmatch(r"What color is the (\w+)\?", question).group(1)
        assert scene.count(shape=shape) == 1 and answer == next(
            o.color for o in scene.objects if o.shape == shape
        )
    elif sample.type == "relation":
        m = re.fullmatch(
            r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", question
        )
        (a,), (b,) = _objects_named(scene, *m.group(1, 2)), _objects_named(scene, *m.group(4, 5))
        assert answer == ("yes" if relation_holds(a, m.group(3), b) else "no")
    elif sample.type == "presence":
        color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question).groups()
        assert answer == ("yes" if scene.count(shape=shape, color=color) else "no")
    elif sample.type == "text":
        assert answer == scene.word.word
    elif sample.type == "chart":
        if question == "Which bar is the tallest?":
            assert answer == scene.chart.tallest()
        else:
            label = re.fullmatch(r"What is the value of the (\w+) bar\?", question).group(1)
            assert answer == str(scene.chart.height_of(label))


def test_every_answer_is_true_of_its_scene_and_short() -> None:
    samples = list(generate_instructions(140, seed=3))
    assert {s.type for s in samples} == set(QUESTION_TYPES)
    for sample in samples:
        _check_answer(sample)
        if sample.type != "caption":
            assert re.fullmatch(r"[a-z0-9]+", sample.answer), sample.answer


def test_yes_no_answers_are_balanced() -> None:
    samples = list(generate_instructions(300, seed=0, type_weights={"presence": 1, "relation": 1}))
    for question_type in ("presence", "relation"):
        answers = [s.answer for s in samples if s.type == question_type]
        assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_deterministic_by_seed_split_and_index() -> None:
    a = make_instruction(7, seed=1)
    b = next(generate_instructions(1, seed=1, start=7))
    assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    other = [make_instruction(i, seed=1, split="test").question for i in range(10)]
    assert other != [make_instruction(i, seed=1).question for i in range(10)]


def test_held_out_pairs_never_reach_training_text() -> None:
    train_pairs, heldout_pairs = split_combinations(seed=5)
    splits = instruction_splits(5, n_train=120, n_test=30)
    seen = set()
    for sample in splits["train"] + splits["test"]:
        assert sample.scene.pairs() <= set(train_pairs)
        seen |= set(PAIR_RE.findall(f"{sample.question} {sample.answer}"))
    assert seen and not seen & set(heldout_pairs)
    assert all(s.scene.pairs() <= set(heldout_pairs) for s in splits["heldout"])
    corpus = " ".join(text_corpus(200, seed=5, pairs=train_pairs))
    assert not set(PAIR_RE.findall(corpus)) & set(heldout_pairs)
    assert text_corpus(20, seed=5) == text_corpus(20, seed=5)


def test_written_files_round_trip_through_the_reader(tmp_path) -> None:
    samples = list(generate_instructions(6, seed=2, image_size=32))
    files = write_instructions(tmp_path, samples, name="val")
    conversations = read_conversations(files.conversations)
    vqa = [json.loads(line) for line in files.vqa.read_text().splitlines()]
    assert len(conversations) == len(vqa) == 6
    for sample, conversation, record in zip(samples, conversations, vqa, strict=True):
        assert conversation.messages == [
            {"role": "user", "content": f"<image>\n{sample.question}"},
            {"role": "assistant", "content": sample.answer},
        ]
        assert conversation.images == [tmp_path / record["image"]] and conversation.images[0].is_file()
        assert record == {"id": conversation.id, "image": record["image"], "question": sample.question,
                          "answers": [sample.answer], "type": sample.type}  # fmt: skip


def test_reader_takes_jsonl_and_image_lists(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    records = [
        {"image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "same"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    first, second = read_conversations(path, image_folder=tmp_path / "imgs")
    assert first.images == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant"] and second.images == []


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": []}, r"record 1: conversations: expected a non-empty list"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, r"record 1: conversations\[0\].from"),
        ({"conversations": [{"from": "gpt", "value": 3}]}, r"record 1: conversations\[0\].value"),
        (
            {"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]},
            r"record 1: 1 image\(s\) but 0",
        ),
        ({"image": 5, "conversations": [{"from": "human", "value": "hi"}]}, r"record 1: image: expected"),
        ("not an object", r"record 1: expected a JSON object"),
    ],
)
def test_malformed_records_name_file_and_index(tmp_path, record, message) -> None:
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(InputError, match=rf"bad\.json {message}"):
        read_conversations(path)


def test_reader_file_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_conversations(tmp_path / "missing.json")
    good = {"conversations": [{"from": "human", "value": "hi"}]}
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(InputError, match=r"broken\.jsonl:2: invalid JSON"):
        read_conversations(tmp_path / "broken.jsonl")


def test_bad_options_are_input_errors() -> None:
    with pytest.raises(InputError, match="split"):
        make_instruction(0, 0, split="validation")
    with pytest.raises(InputError, match="type_weights"):
        make_instruction(0, 0, type_weights={"ocr": 1.0})


def test_dataset_encodes_written_conversations(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmlm.processing.image import ImageProcessor
    from mmlm.processing.vlm_processor import IGNORE_INDEX, VLMProcessor, add_image_token

    files = write_instructions(tmp_path, list(generate_instructions(3, seed=4)))
    words = {w for s in text_corpus(50, 0) for w in re.findall(r"\w+|[^\w\s]", s)} | {
        "USER",
        "ASSISTANT",
        ":",
    }
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *sorted(words)])}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["</s>"])
    add_image_token(tokenizer)
    processor = VLMProcessor(tokenizer, ImageProcessor.siglip(32), 4, special_tokens={"eos_token": "</s>"})
    dataset = ConversationDataset(read_conversations(files.conversations), processor)
    batch = processor.collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * 4
    assert int((batch["labels"] == tokenizer.token_to_id("</s>")).sum()) == 3  # each answer ends in eos
    assert (batch["labels"] != IGNORE_INDEX).sum() > 3


def test_split_and_corpus_writers(tmp_path) -> None:
    files = write_instruction_splits(tmp_path, seed=1, n_train=3, n_test=2)
    assert {name: len(read_conversations(f.conversations)) for name, f in files.items()} == {
        "train": 3, "test": 2, "heldout": 2,
    }  # fmt: skip
    corpus = write_text_corpus(tmp_path / "corpus" / "text.txt", 5, seed=1)
    assert corpus.read_text().splitlines() == text_corpus(5, seed=1)
