"""`mmlm demo --modality video`: the clips become conversations and MP4 files, and the whole run works end to end."""

import json

import pytest

from mmlm.data.conversations import read_conversations
from mmlm.demo_video import (
    FRAMES,
    frame_indices,
    run_video_demo,
    score_clips,
    write_test_set,
    write_train_set,
)
from mmlm.processing.video import read_video


def test_frames_are_segment_centres_as_read_video_samples_them(tmp_path):
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    rows = write_test_set(tmp_path, clips=2)
    assert len(read_video(rows[0]["video"], num_frames=FRAMES).frames) == FRAMES


def test_training_clips_are_llava_conversations_with_one_image_per_frame(tmp_path):
    conversations = read_conversations(write_train_set(tmp_path, clips=4))
    assert len(conversations) == 4 and all(len(c.images) == FRAMES for c in conversations)
    assert all(p.is_file() for c in conversations for p in c.images)
    assert conversations[0].messages[0]["content"].startswith("<image>" * FRAMES + "\n")


def test_clips_are_scored_by_the_harness_per_kind(tmp_path, monkeypatch):
    canned = {"left": "Left.", "red": "blue", "yellow star": "yellow star", "white square": "a white square"}

    class Canned:  # answers by the reference, to check the scoring alone
        def __init__(self, loaded, name, num_frames):
            self.name, self.num_frames = name, num_frames

        def generate(self, prompts, media, max_new_tokens, temperature=0.0):
            assert all(type(items[0]).__name__ == "Video" for items in media) and self.num_frames == FRAMES
            return [canned[answer] for answer in next(order)]

    monkeypatch.setattr("mmlm.eval.backends.MMLMBackend", Canned)
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
    summary = run_video_demo(tmp_path, steps=3, train_clips=8, test_clips=4)
    assert 0 <= summary["video_accuracy"] <= 1 and 0 <= summary["video_blind_accuracy"] <= 1
    assert json.loads((tmp_path / "video_summary.json").read_text())["video_test_clips"] == 4
    assert (tmp_path / "video_vlm" / "config.json").is_file()
