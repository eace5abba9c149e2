"""`mmlm demo --modality video`: the clips become conversations and MP4 files, and the whole run works end to end."""

import json
import shutil

import pytest

from mmlm.data.conversations import read_conversations
from mmlm.data.synthetic.videos import VIDEO_KINDS, make_video
from mmlm.processing.video import read_video
from mmlm.recipes.demo_video import (
    DESCRIBE,
    FRAMES,
    frame_indices,
    run_video_demo,
    score_clips,
    write_test_set,
    write_train_set,
)


def test_frames_are_segment_centres_as_read_video_samples_them(tmp_path):
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    rows = write_test_set(tmp_path, clips=2)
    assert len(read_video(rows[0]["video"], num_frames=FRAMES).frames) == FRAMES


def test_training_clips_are_llava_conversations_with_their_frames_as_a_video(tmp_path):
    conversations = read_conversations(write_train_set(tmp_path, clips=4, frames=8))
    assert len(conversations) == 4 and all(
        len(c.videos) == 1 and len(c.videos[0]) == 8 for c in conversations
    )
    assert all(p.is_file() for c in conversations for p in c.videos[0]) and not conversations[0].images
    assert conversations[0].messages[0]["content"].startswith("<video>\n")
    sample = make_video(VIDEO_KINDS[1], seed=1, frames=16)  # the second clip: an object appears
    turns = [m["content"] for m in conversations[1].messages]
    question = "<video>\n" + sample.question  # first, so no answer is read off the caption
    assert turns == [question, sample.answer, DESCRIBE, sample.caption]
    alone = read_conversations(write_train_set(tmp_path / "alone", clips=1, frames=4, describe=False))
    assert len(alone[0].messages) == 2


def test_extracted_frames_fill_pooled_slots_as_the_video_file_would(tmp_path):
    from mmlm.data.conversations import encode_conversation

    conversation = read_conversations(write_train_set(tmp_path, clips=1, frames=8))[0]

    class Recorder:  # the processor's view of the conversation
        def encode(self, messages, images, audio=None):
            return messages, images

    messages, images = encode_conversation(Recorder(), conversation, frames=8, video_pool=2)
    assert messages[0]["content"].startswith("<image>" * 4 + "\n")  # 8 frames, 2 per slot
    assert [len(group) for group in images] == [2, 2, 2, 2] and images[0][0] == conversation.videos[0][0]


def test_clips_are_scored_by_the_harness_per_kind(tmp_path, monkeypatch):
    canned = {"left": "Left.", "red": "blue", "yellow star": "yellow star", "white square": "a white square"}

    class Canned:  # answers by the reference, to check the scoring alone
        def __init__(self, loaded, name, num_frames):
            self.name, self.num_frames = name, num_frames

        def generate(self, prompts, media, max_new_tokens, temperature=0.0):
            assert all(type(items[0]).__name__ == "Video" for items in media) and self.num_frames == FRAMES
            return [canned[answer] for answer in next(order)]

    monkeypatch.setattr("mmlm.recipes.demo_video.MMLMBackend", Canned)
    rows = write_test_set(tmp_path, clips=4)  # one clip of each kind
    rows = [
        {**r, "answer": a} for r, a in zip(rows, ["left", "yellow star", "white square", "red"], strict=True)
    ]
    order = iter([[r["answer"] for r in rows]] * 2)
    scores = score_clips(None, rows, tmp_path / "eval")
    assert scores["normal"]["accuracy"] == 0.75 and scores["normal"]["accuracy_color"] == 0.0
    assert scores["normal"]["accuracy_disappear"] == 1.0 and set(scores) == {"normal", "blind"}


@pytest.mark.slow
def test_the_video_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)
    summary = run_video_demo(
        tmp_path, steps=3, train_clips=8, test_clips=4, frames=4, video_pool=2, video_merge="resampler"
    )
    assert 0 <= summary["video_accuracy"] <= 1 and 0 <= summary["video_blind_accuracy"] <= 1
    saved = json.loads((tmp_path / "video_summary.json").read_text())
    assert saved["video_test_clips"] == 4 and (saved["video_pool"], saved["video_slots"]) == (2, 2)
    assert (
        json.loads((tmp_path / "video_vlm" / "config.json").read_text())["config"]["connector"]["max_frames"]
        == 2
    )
    assert (tmp_path / "video_vlm" / "config.json").is_file()
    assert saved["video_start"] == "tower" and 0 <= saved["video_val_accuracy"] <= 1


@pytest.mark.slow
def test_the_video_demo_goes_on_from_the_image_demos_vlm(tmp_path, monkeypatch):
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)
    first = tmp_path / "first"
    run_video_demo(first, steps=3, train_clips=8, test_clips=4)  # an MLP-connector VLM, as the image demo's
    shutil.copytree(first / "video_vlm", tmp_path / "vlm")
    summary = run_video_demo(tmp_path, steps=3, train_clips=8, test_clips=4)
    assert summary["video_start"] == "image VLM"
    stages = json.loads((tmp_path / "video_train" / "config.json").read_text())["stages"]
    assert list(stages) == ["instruct"]  # its connector came with it: nothing to align
    metrics = (tmp_path / "video_train" / "metrics.jsonl").read_text().splitlines()
    skipped = [key for line in metrics for key in json.loads(line) if key.startswith("skipped")]
    assert not skipped  # both turns fit
    assert (tmp_path / "video_vlm" / "tokenizer.json").read_bytes() == (
        tmp_path / "vlm" / "tokenizer.json"
    ).read_bytes()


def test_bad_demo_settings_are_one_line_errors(tmp_path, capsys):
    from mmlm.cli import main

    assert main(["demo", "--modality", "video", "--video-pool", "0", "--out", str(tmp_path)]) == 2
    assert "--frames and --video-pool: expected at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_both_turns_fit_the_run_with_the_image_demos_bpe(tmp_path):
    # the video run goes on from the image demo's VLM, so its text is written with that run's BPE, trained on the
    # shapes world's image conversations, which never say "appears" or "seconds"
    from tokenizers import Tokenizer

    from mmlm.data.synthetic import shapes
    from mmlm.processing.bpe import EOS
    from mmlm.processing.chat import ChatTemplate
    from mmlm.recipes.demo_video import demo_video_config
    from mmlm.recipes.demo_vlm import demo_vlm_config
    from mmlm.train.mixing import corpus_texts
    from mmlm.train.vlm_build import build_tokenizer

    image_run = demo_vlm_config(tmp_path / "image", None)
    world, _ = shapes.split_world(0)
    corpus = lambda: corpus_texts([s.data for s in image_run.stages.values()], 0, world, per_source=1000)  # noqa: E731
    bpe = Tokenizer.from_file(str(build_tokenizer(image_run, tmp_path / "image", corpus) / "tokenizer.json"))
    train_json = write_train_set(tmp_path / "clips", clips=200, frames=FRAMES)
    video_run = demo_video_config(tmp_path / "video", train_json, None, steps=1)
    text_room = video_run.max_length - FRAMES * video_run.model.vision.grid**2
    template = ChatTemplate.llava_v1(EOS)
    lengths = [
        len(bpe.encode(template.render_text(c.messages).replace("<video>", "")).ids)
        for c in read_conversations(train_json)
    ]
    assert max(lengths) <= text_room and max(lengths) > text_room - 40  # fits, and the room is not idle
