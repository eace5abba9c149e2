"""Videos in prompts: each `<video>` or video part becomes one image slot per sampled frame, in place."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.cli import main
from mmlm.data.synthetic.videos import make_video, write_video
from mmlm.errors import InputError
from mmlm.processing import chat
from mmlm.processing.chat import ChatTemplate
from mmlm.processing.video import read_video
from mmlm.processing.video_prompt import expand_videos


def frames_of(video: str) -> list[Image.Image]:
    """A fake sampler: three frames named after the video."""
    return (
        [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(3)]
        if video == "clip"
        else [Image.new("RGB", (4, 4))]
    )


def test_a_video_placeholder_becomes_its_frames_in_place():
    first, last = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    prompt, images = expand_videos("<image> a <video> b <image>", [first, last], ["clip"], frames_of)
    assert prompt == "<image> a <image><image><image> b <image>"
    assert (
        images[0] is first
        and images[-1] is last
        and [im.getpixel((0, 0))[0] for im in images[1:4]] == [0, 1, 2]
    )


def test_video_parts_in_chat_messages():
    messages = [
        {"role": "user", "content": [{"type": "video", "video": "clip"}, {"type": "text", "text": "hi"}]}
    ]
    out, images = expand_videos(messages, None, [], frames_of)
    assert images is None  # the frames travel in the parts, as image sources
    assert [p["type"] for p in out[0]["content"]] == ["image"] * 3 + ["text"]
    picture = Image.new("RGB", (4, 4))
    parts = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "q"}]
    out, images = expand_videos([{"role": "user", "content": parts}], [picture], ["clip"], frames_of)
    assert (
        images[0] is picture
        and len(images) == 4
        and [p["type"] for p in out[0]["content"]] == ["image"] * 4 + ["text"]
    )


@pytest.mark.parametrize("template", [ChatTemplate.llava_v1(), ChatTemplate.chatml()])
@pytest.mark.parametrize(
    "content",
    [
        [{"type": "video", "video": "clip"}, {"type": "text", "text": "What moves?"}],  # a video part
        "<video>\nWhat moves?",  # a placeholder in string content, no image list
    ],
)
def test_a_videos_slots_render_together_as_training_text_writes_them(template, content):
    # `mmlm train vlm` writes a conversation's "<video>\n" as the slots' tokens, together, then one newline;
    # chat messages (the harness, `mmlm chat --video`, the server) must give the model the same text
    out, _ = (
        expand_videos([{"role": "user", "content": content}], None, [], frames_of)
        if isinstance(content, list)
        else expand_videos([{"role": "user", "content": content}], None, ["clip"], frames_of)
    )
    trained = template.render_text([{"role": "user", "content": "<image><image><image>\nWhat moves?"}], True)
    assert template.render_text(out, True) == trained


def test_a_template_saved_with_the_old_image_macro_reads_video_slots_together():
    old = ChatTemplate(chat.LLAVA_V1_TEMPLATE.replace(chat._CONTENT_MACRO, chat._CONTENT_MACRO_V0))
    assert old.source == chat.LLAVA_V1_TEMPLATE  # read with the current macro
    out, _ = expand_videos(
        [{"role": "user", "content": [{"type": "video", "video": "clip"}]}], None, [], frames_of
    )
    assert old.render_text(out) == "USER: <image><image><image>\n "


@pytest.mark.parametrize(
    ("prompt", "videos", "message"),
    [
        ("<video> <video>", ["clip"], "more placeholders than videos"),
        ("<video>", ["clip", "clip"], "fewer <video>"),
    ],
)
def test_video_counts_must_match(prompt, videos, message):
    with pytest.raises(InputError, match=message):
        expand_videos(prompt, [], videos, frames_of)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_prompt")
    write_tiny_llava(root / "llava")
    frames, *_ = make_video("move", seed=3, frames=8, size=64)
    write_video(frames, root / "clip.mp4", fps=8)
    return root


def test_generate_with_a_video_equals_its_frames_as_images(world):
    torch.manual_seed(0)
    model = mmlm.load(world / "llava")
    clip = str(world / "clip.mp4")
    frames = read_video(clip, num_frames=2).frames
    with_video = model.generate(
        "USER: <video>\nWhat moves? ASSISTANT:", videos=[clip], num_frames=2, max_new_tokens=6
    )
    with_images = model.generate("USER: <image><image>\nWhat moves? ASSISTANT:", frames, max_new_tokens=6)
    assert with_video == with_images
    pieces = "".join(
        model.stream("USER: <video>\nWhat moves? ASSISTANT:", videos=clip, num_frames=2, max_new_tokens=6)
    )
    assert pieces == with_video


def test_chat_cli_takes_a_video(world, capsys):
    clip = str(world / "clip.mp4")
    assert main(["chat", "--model", str(world / "llava"), "--video", clip, "--frames", "2",
                 "--max-new-tokens", "5", "What moves?"]) == 0  # fmt: skip
    printed = capsys.readouterr().out.strip()
    model = mmlm.load(world / "llava")
    messages = [
        {"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": "What moves?"}]}
    ]
    assert (
        printed == model.generate(messages, read_video(clip, num_frames=2).frames, max_new_tokens=5).strip()
    )
    assert main(["chat", "--model", str(world / "llava"), "--video", str(world / "none.mp4"), "hi"]) == 2
    assert "none.mp4" in capsys.readouterr().err


def test_a_video_placeholder_in_string_message_content_without_images():
    messages = [{"role": "user", "content": "<video>\nWhat moves?"}]
    out, images = expand_videos(messages, None, ["clip"], frames_of)
    assert images is None
    assert [p["type"] for p in out[0]["content"]] == ["image"] * 3 + ["text"]
    assert out[0]["content"][-1]["text"] == "\nWhat moves?"


def test_grouped_frames_share_a_slot_in_order():
    prompt, images = expand_videos("a <video> b", None, ["clip"], frames_of, group=2)
    assert prompt == "a <image><image> b"
    assert [len(s) for s in images] == [2, 1] and [f.getpixel((0, 0))[0] for f in images[0]] == [0, 1]
    messages = [{"role": "user", "content": [{"type": "video", "video": "clip"}]}]
    out, _ = expand_videos(messages, None, [], frames_of, group=3)
    assert len(out[0]["content"]) == 1 and len(out[0]["content"][0]["image"]) == 3


def test_video_pool_averages_each_groups_patch_features(world):
    model = mmlm.load(world / "llava")
    model.model.cfg = dataclasses.replace(model.config, video_pool=2)
    clip = str(world / "clip.mp4")
    frames = read_video(clip, num_frames=4).frames
    batch = model.processor("USER: <image><image> hi", [tuple(frames[:2]), tuple(frames[2:])])
    assert batch["image_frames"].tolist() == [2, 2] and len(batch["pixel_values"]) == 4
    slots = batch["input_ids"] == model.config.image_token_id
    assert int(slots.sum()) == 2 * model.model.image_tokens  # four frames, two slots' worth of tokens
    with torch.no_grad():
        embeds, _ = model.model.prepare(
            batch["input_ids"], batch["pixel_values"], None, batch["image_frames"]
        )
        features = model.model.patch_features(batch["pixel_values"])  # [4, N, D]
        want = model.model.visual_tokens(features.view(2, 2, *features.shape[1:]).mean(1))
    torch.testing.assert_close(embeds[slots], want.flatten(0, 1))
    pooled = model.generate(
        "USER: <video>\nWhat moves? ASSISTANT:", videos=[clip], num_frames=4, max_new_tokens=5
    )
    grouped = model.generate("USER: <image><image>\nWhat moves? ASSISTANT:", [tuple(frames[:2]), tuple(frames[2:])],
                             max_new_tokens=5)  # fmt: skip
    assert pooled == grouped


def test_the_resampler_reads_a_groups_frames_with_time_embeddings():
    from mmlm.fusion import ConnectorConfig
    from mmlm.models.decoder_lm import LMConfig
    from mmlm.models.vision import VisionConfig
    from mmlm.models.vlm import VisionLanguageModel, VLMConfig

    vision = VisionConfig(
        image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32, embed_dim=None
    )
    connector = ConnectorConfig(kind="perceiver", num_queries=3, depth=1, heads=2, max_frames=4)
    lm = LMConfig(vocab_size=40, width=16, layers=1, heads=2, kv_heads=1, mlp_dim=32)
    cfg = VLMConfig(vision, lm, connector, image_token_id=39, video_pool=4, video_merge="resampler")
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    features = torch.randn(5, 4, 16)  # a 3-frame group then a 2-frame group
    with torch.no_grad():
        got = model.slot_tokens(features, torch.tensor([3, 2]))
        want = torch.cat([model.connector(features[None, :3]), model.connector(features[None, 3:])])
        reversed_order = model.slot_tokens(features[[2, 1, 0, 3, 4]], torch.tensor([3, 2]))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[0], reversed_order[0])  # time embeddings: frame order matters
    for change, match in [({"video_pool": 5}, "max_frames >= 5"), ({"video_merge": "max"}, "video_merge"),
                          ({"video_pool": 0}, "video_pool")]:  # fmt: skip
        with pytest.raises(InputError, match=match):
            VisionLanguageModel(dataclasses.replace(cfg, **change))


@pytest.mark.parametrize(("merge", "connector"), [("mean", {"kind": "mlp"}),
                         ("resampler", {"kind": "perceiver", "num_queries": 4, "depth": 1, "heads": 2, "max_frames": 2})])  # fmt: skip
def test_the_trainer_reads_video_records_and_pools_them(tmp_path, monkeypatch, merge, connector):
    from mmlm.train.vlm_config import vlm_config_from_dict
    from mmlm.train.vlm_loop import run_vlm_training

    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)
    records = []
    for i, kind in enumerate(["move", "appear", "disappear", "color"] * 2):
        sample = make_video(kind, seed=i, frames=8, size=32)
        write_video(sample.frames, tmp_path / f"v{i}.mp4", fps=8)
        records.append({"video": f"v{i}.mp4", "conversations": [{"from": "human", "value": "<video>\n" + sample.question},
                                                                {"from": "gpt", "value": sample.answer}]})  # fmt: skip
    (tmp_path / "videos.json").write_text(json.dumps(records))
    model = {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
             "lm": {"width": 32, "layers": 1, "heads": 2, "kv_heads": 1, "mlp_dim": 64}, "vocab_size": 300,
             "connector": connector, "video_pool": 2, "video_merge": merge}  # fmt: skip
    stages = {"train": {"steps": 2, "train": ["connector", "lm"],
                        "data": {"source": str(tmp_path / "videos.json"), "video_frames": 4}}}  # fmt: skip
    cfg = vlm_config_from_dict({"model": model, "stages": stages, "batch_size": 4, "max_length": 128,
                                "log_every": 1, "eval_samples": 0, "out_dir": str(tmp_path / "run"), "device": "cpu"})  # fmt: skip
    loaded, logged = run_vlm_training(cfg)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    sample = loaded.processor.encode(*_first_record_as_prompt(tmp_path, loaded))
    assert sample.image_frames == [2, 2]  # 4 frames, 2 per slot
    assert int((sample.input_ids == loaded.config.image_token_id).sum()) == 2 * loaded.model.image_tokens
    again = mmlm.load(tmp_path / "run" / "model")
    assert (again.config.video_pool, again.config.video_merge) == (2, merge)


def _first_record_as_prompt(folder, loaded):
    from mmlm.data.conversations import read_conversations

    conversation = read_conversations(folder / "videos.json")[0]
    frames = read_video(conversation.videos[0], num_frames=4).frames
    prompt, images = expand_videos(conversation.messages, [], [frames], lambda v: v, loaded.config.video_pool)
    return prompt, images


def test_eval_vlm_runs_video_samples_with_a_grey_blind_video(world, tmp_path, capsys):
    from mmlm.eval.backends import MMLMBackend
    from mmlm.eval.harness import evaluate_vlm
    from mmlm.eval.tasks import Task, read_samples

    frames, *_ = make_video("color", seed=5, frames=8, size=64)
    write_video(frames, tmp_path / "other.mp4", fps=8)
    rows = [{"id": "a", "question": "What moves?", "video": str(world / "clip.mp4"), "answers": ["circle"]},
            {"id": "b", "question": "What changes?", "video": "other.mp4", "answers": ["colour"]}]  # fmt: skip
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = read_samples(tmp_path / "samples.jsonl")
    assert [s.medium for s in samples] == ["video", "video"]
    backend = MMLMBackend.load(str(world / "llava"), num_frames=2)
    assert backend.name.endswith(":frames=2")  # frames change answers, so they are part of the cache name
    task = Task(
        "clips", str(tmp_path / "samples.jsonl"), "{question}", "vqa", "exact_match", max_new_tokens=4
    )
    result = evaluate_vlm(backend, task, samples, probes=["normal", "blind", "shuffled"], progress=False)
    normal = {r["id"]: r["prediction"] for r in result["records"] if r["probe"] == "normal"}
    want = backend.model.generate([[{"role": "user", "content": "<video>\nWhat moves?"}]], videos=[[str(world / "clip.mp4")]],
                                  num_frames=2, max_new_tokens=4)[0].strip()  # fmt: skip
    assert normal["a"] == want
    assert {r["image_from"] for r in result["records"] if r["probe"] == "shuffled"} == {"a", "b"}
    assert "<video>" in result["example_model_input"]
    with pytest.raises(InputError, match="image and video given; a sample shows the model one of"):
        bad = {"id": "c", "question": "q", "video": "other.mp4", "image": "x.png"}
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        read_samples(tmp_path / "bad.jsonl")


def test_training_stops_with_one_line_when_no_sample_fits_max_length(tmp_path, monkeypatch):
    from mmlm.train.vlm_config import vlm_config_from_dict
    from mmlm.train.vlm_loop import run_vlm_training

    frames, *_ = make_video("move", seed=1, frames=8, size=32)
    write_video(frames, tmp_path / "v.mp4", fps=8)
    record = {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat moves?"},
                                                  {"from": "gpt", "value": "circle"}]}  # fmt: skip
    (tmp_path / "videos.json").write_text(json.dumps([record] * 4))
    model = {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
             "lm": {"width": 32, "layers": 1, "heads": 2, "kv_heads": 1, "mlp_dim": 64}, "vocab_size": 300}  # fmt: skip
    stages = {"train": {"steps": 2, "data": {"source": str(tmp_path / "videos.json"), "video_frames": 8}}}
    cfg = vlm_config_from_dict({"model": model, "stages": stages, "batch_size": 2, "max_length": 64,
                                "eval_samples": 0, "out_dir": str(tmp_path / "run"), "device": "cpu"})  # fmt: skip
    with pytest.raises(InputError, match="do not fit in max_length 64") as error:  # 8 frames x 16 tokens > 64
        run_vlm_training(cfg)
    assert "\n" not in str(error.value)
