"""Qwen2-VL / Qwen2.5-VL videos: temporal patches equal to transformers' image path regrouped by
temporal_patch_size, M-RoPE's time axis equal to transformers' get_rope_index, logits within 1e-4 and greedy
generations token-identical to transformers with `pixel_values_videos`, the chat command, and bad inputs."""

import pytest
import torch
import transformers
from fixtures_qwen2_vl import write_tiny_qwen2_vl
from PIL import Image
from skimage import data

import mmlm
from mmlm.cli import main
from mmlm.data.synthetic.videos import write_video
from mmlm.errors import InputError
from mmlm.inference.qwen2_vl import image_grid_thw
from mmlm.models.mrope import mrope_positions
from mmlm.processing.qwen2_vl_video import qwen2_vl_batch, qwen2_vl_video_from_hf

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
EOS = 2


def clip(count: int = 4, height: int = 240, width: int = 320) -> list[Image.Image]:
    """`count` frames of one size, a camera panning across the astronaut photograph."""
    photo = data.astronaut()
    return [Image.fromarray(photo[20 * i : 20 * i + height, 30 * i : 30 * i + width]) for i in range(count)]


def chat(text: str, images: int, videos: int) -> str:
    return f"<|im_start|>user\n{IMAGE * images}{VIDEO * videos}{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_tiny_qwen2_vl(folder, model_type=request.param)
    return ref, mmlm.load(folder), folder


def reference_processor() -> transformers.Qwen2VLImageProcessorPil:
    return transformers.Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=20 * 28 * 28, patch_size=14,
                                                 merge_size=2, temporal_patch_size=2)  # fmt: skip


def video_patches(frames, settings=None):
    ours = qwen2_vl_video_from_hf(settings, reference_processor().to_dict())
    return ours(frames)


@pytest.mark.parametrize("count", [4, 3])
def test_video_patches_are_the_image_path_regrouped_by_temporal_patch(count):
    frames = clip(count)
    video = video_patches(frames)
    t, h, w = video.grid
    assert (t, h, w) == ((count + 1) // 2, 6, 10)  # 240×320 px at 4..20 blocks of 28 px; 3 frames pad to 4
    # transformers' image path: each frame a still video, its patch repeated as both temporal frames
    per_frame = [reference_processor()([f], return_tensors="pt")["pixel_values"] for f in frames]
    per_frame += [per_frame[-1]] * (-count % 2)  # the last frame repeats up to a whole temporal patch
    stills = torch.stack([p.reshape(h * w, 3, 2, 14 * 14)[:, :, 0] for p in per_frame])  # [F, h·w, C, p·p]
    expected = stills.reshape(t, 2, h * w, 3, 14 * 14).permute(0, 2, 3, 1, 4).reshape(t * h * w, -1)
    torch.testing.assert_close(video.patches, expected, atol=0, rtol=0)


def test_a_one_frame_video_is_the_image_path():
    frame = clip(1, 300, 451)[0]
    video = video_patches([frame])
    theirs = reference_processor()([frame], return_tensors="pt")
    assert video.grid == tuple(theirs["image_grid_thw"][0].tolist())
    torch.testing.assert_close(video.patches, theirs["pixel_values"], atol=0, rtol=0)


def test_the_video_processor_settings_set_the_pixel_range():
    small = video_patches(clip(2), {"size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 6 * 28 * 28}})
    assert small.grid == (1, 4, 4)  # 240×320 px within 6 blocks of 28 px, not the image's 20
    assert video_patches(clip(2)).grid == (1, 6, 10)


def reference_inputs(m, batch, second_per_grid) -> dict:
    ids = batch["input_ids"]  # transformers' generate takes no None media
    types = (ids == m.config.image_token_id).int() + 2 * (ids == m.config.video_token_id).int()
    return {k: v for k, v in dict(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                image_grid_thw=image_grid_thw(batch["image_grid"]), pixel_values_videos=batch["video_values"],
                video_grid_thw=batch["video_grid"],
                second_per_grid_ts=None if m.config.tokens_per_second is None else second_per_grid,
                mm_token_type_ids=types).items() if v is not None}  # fmt: skip


def batch_of(m, prompt, images, videos, num_frames: int = 8):
    return qwen2_vl_batch(m.processor, m.video_processing, m.config.video_token_id, [prompt], [images], [videos],
                          num_frames)  # fmt: skip


@pytest.mark.parametrize("with_image", [False, True])
def test_logits_and_positions_match_transformers(pair, with_image):
    ref, m, _ = pair
    images = [Image.fromarray(data.chelsea())] if with_image else []
    batch = batch_of(m, chat("What happens?", len(images), 1), images, [clip(4)])
    assert batch["video_grid"].tolist() == [[2, 6, 10]]
    assert int((batch["input_ids"] == m.config.video_token_id).sum()) == 2 * 6 * 10 // 4
    # 1 s per temporal patch: Qwen2.5-VL's time steps of tokens_per_second (4); 0.9 s: ⌊k · 3.6⌋ truncates
    for seconds in (1.0, 0.9):
        second_per_grid = torch.tensor([seconds])
        inputs = reference_inputs(m, batch, second_per_grid)
        with torch.no_grad():
            theirs = ref(**inputs).logits
            ours = m.model(batch["input_ids"], batch["pixel_values"], image_grid_thw(batch["image_grid"]),
                           video_values=batch["video_values"], video_grid=batch["video_grid"],
                           second_per_grid=second_per_grid).logits  # fmt: skip
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        their_positions, their_deltas = ref.model.get_rope_index(**{k: inputs.get(k) for k in (
            "input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
            "attention_mask")})  # fmt: skip
        interval = (
            None if m.config.tokens_per_second is None else second_per_grid * m.config.tokens_per_second
        )
        positions, deltas = mrope_positions(batch["input_ids"], image_grid_thw(batch["image_grid"]),
                                            m.config.image_token_id, 2, batch["attention_mask"],
                                            batch["video_grid"], m.config.video_token_id, interval)  # fmt: skip
        assert torch.equal(positions, their_positions) and deltas.tolist() == their_deltas[:, 0].tolist()
    video_times = positions[0, 0, batch["input_ids"][0] == m.config.video_token_id]
    steps = sorted(set((video_times - video_times.min()).tolist()))
    assert steps == ([0, 1] if m.config.tokens_per_second is None else [0, 3])  # Qwen2.5-VL: ⌊1 · 4 · 0.9⌋


def reference_generate(m, ref, batch, max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(**reference_inputs(m, batch, batch["second_per_grid"]), max_new_tokens=max_new_tokens,
                           do_sample=False)  # fmt: skip
    row = out[0, batch["input_ids"].shape[1] :].tolist()
    return row[: row.index(EOS)] if EOS in row else row


def test_greedy_generation_with_a_video_is_token_identical(pair):
    ref, m, _ = pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "Describe both."}]}]  # fmt: skip
    photo, frames = Image.fromarray(data.coffee()), clip(4)
    batch = batch_of(m, messages, [photo], [frames])
    assert batch["second_per_grid"].tolist() == [
        pytest.approx(2 / 24)
    ]  # frames without times: transformers' 24 fps
    theirs = reference_generate(m, ref, batch, 20)
    assert len(theirs) == 20
    assert m.generate(messages, [photo], videos=[frames], max_new_tokens=20) == m.decode(theirs)


def test_chat_video_file_matches_transformers_on_its_sampled_frames(pair, tmp_path, capsys):
    ref, m, folder = pair
    path = write_video(clip(8, 240, 320), tmp_path / "pan.mp4", 4.0)  # 2 s at 4 fps
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    batch = batch_of(m, messages, None, [str(path)], num_frames=4)
    # 4 segment centres of 2 s: 2 frames per second, so 1 s per temporal patch of 2 frames
    assert batch["video_grid"].tolist() == [[2, 6, 10]] and batch["second_per_grid"].tolist() == [1.0]
    theirs = m.decode(reference_generate(m, ref, batch, 6))
    assert m.generate(messages, videos=[str(path)], num_frames=4, max_new_tokens=6) == theirs
    argv = ["chat", "--model", str(folder), "--video", str(path), "What moves?", "--frames", "4",
            "--max-new-tokens", "6"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == theirs + "\n"


def test_bad_video_inputs(pair):
    _, m, _ = pair
    with pytest.raises(InputError, match=r"^videos: got 2 video\(s\) but fewer <\|video_pad\|> placeholders"):
        m.generate(chat("Hi", 0, 1), videos=[clip(2), clip(2)], max_new_tokens=2)
    with pytest.raises(InputError, match=r"^videos: more video placeholders than videos given$"):
        m.generate(chat("Hi", 0, 2), videos=[clip(2)], max_new_tokens=2)
    mixed = [clip(1)[0], clip(1, 200, 320)[0]]
    with pytest.raises(InputError) as error:
        m.generate(chat("Hi", 0, 1), videos=[mixed], max_new_tokens=2)
    assert (
        str(error.value)
        == "videos: frames of different sizes [(200, 320), (240, 320)]; expected one size per video"
    )
    with pytest.raises(InputError, match=r"^videos: a video with no frames; expected at least one$"):
        m.generate(chat("Hi", 0, 1), videos=[[]], max_new_tokens=2)
