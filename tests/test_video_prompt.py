"""Videos in prompts: each `<video>` or video part becomes one image slot per sampled frame, in place."""

import pytest
import torch
from PIL import Image

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.cli import main
from mmlm.data.videos import make_video, write_video
from mmlm.errors import InputError
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
