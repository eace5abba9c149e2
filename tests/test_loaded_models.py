"""What the loaded models share: mmlm's folder format, left padding, frame means, and videos expanded by the
VLM processor in the same pass as images."""

import dataclasses
import json

import pytest
import torch

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.checkpoints.mmlm_format import MMLM_VERSION, load_mmlm_model, mmlm_architecture, read_mmlm
from mmlm.data.synthetic.videos import make_video, write_video
from mmlm.errors import InputError
from mmlm.inference.audio import AudioModel
from mmlm.models.audio_encoder import AudioConfig, AudioEncoder
from mmlm.models.frame_pooling import mean_frames
from mmlm.processing.padding import left_pad, pad_rows
from mmlm.processing.video_prompt import expand_videos, frame_sampler


def test_an_mmlm_folder_keeps_its_config_json_keys_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = AudioConfig(n_mels=8, width=16, layers=1, heads=2, mlp_dim=32, max_frames=10)
    model = AudioModel(AudioEncoder(cfg).eval())
    model.save_pretrained(tmp_path)
    written = (tmp_path / "config.json").read_text()
    # the bytes older mmlm versions wrote, so their folders and ours read alike
    expected = {
        "mmlm_version": MMLM_VERSION,
        "architecture": "audio_encoder",
        "config": dataclasses.asdict(cfg),
    }
    assert written == json.dumps(expected, indent=2) + "\n"
    assert mmlm_architecture(json.loads(written)) == "audio_encoder"
    assert mmlm_architecture({"model_type": "llama"}) is None
    back_cfg, weights, rules = read_mmlm(tmp_path, json.loads(written), AudioConfig)
    assert back_cfg == cfg and {r.ours for r in rules} == {(k,) for k in model.model.state_dict()}
    back = load_mmlm_model(
        tmp_path, json.loads(written), AudioConfig, AudioEncoder, torch.device("cpu"), torch.float32
    )
    for key, value in model.model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    loaded = mmlm.load(tmp_path)
    assert isinstance(loaded, AudioModel) and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    with pytest.raises(InputError, match="unknown save format 'onnx'"):
        loaded.save_pretrained(tmp_path / "again", format="onnx")


def test_rows_are_left_padded_for_generation_and_right_padded_for_training():
    assert pad_rows([[5, 6, 7], [8]], 0).tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pad_rows([[5, 6, 7], [8]], -100, "right").tolist() == [[5, 6, 7], [8, -100, -100]]
    assert pad_rows([[8]], 1, length=3).tolist() == [[1, 1, 8]]
    assert pad_rows([], 0).shape == (0, 0)
    cache = torch.ones(2, 3, 4, 5)  # [B, H, S, Dh]: padded along S, the time axis
    padded = left_pad(cache, 6, dim=2)
    assert padded.shape == (2, 3, 6, 5) and padded[:, :, :2].eq(0).all() and padded[:, :, 2:].eq(1).all()
    assert left_pad(cache, 4, dim=2) is cache


def test_frames_are_averaged_in_groups_of_a_size_or_of_given_sizes():
    frames = torch.arange(5.0).view(5, 1, 1).expand(5, 2, 3)  # frame t holds t
    assert mean_frames(frames, 2)[:, 0, 0].tolist() == [0.5, 2.5, 4.0]
    assert mean_frames(frames, [3, 2])[:, 0, 0].tolist() == [1.0, 3.5]
    states = torch.randn(2, 12, 4)  # [B, T, D]: grouped along T
    torch.testing.assert_close(mean_frames(states, 4, dim=1), states.reshape(2, 3, 4, 4).mean(2))


def test_the_processor_expands_videos_as_expanding_them_first_did(tmp_path):
    write_tiny_llava(tmp_path / "llava")
    frames, *_ = make_video("move", seed=3, frames=8, size=64)
    clip = str(tmp_path / "clip.mp4")
    write_video(frames, clip, fps=8)
    processor = mmlm.load(tmp_path / "llava").processor
    prompts = ["USER: <video>\nWhat moves? ASSISTANT:", "USER: <video> and <video>? ASSISTANT:"]
    videos = [[clip], [clip, clip]]
    got = processor(prompts, videos=videos, num_frames=4, video_pool=2)
    sample = frame_sampler(4)
    expanded = [expand_videos(p, None, v, sample, 2) for p, v in zip(prompts, videos, strict=True)]
    want = processor([p for p, _ in expanded], [i for _, i in expanded])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_frames"):
        assert torch.equal(got[key], want[key]), key
    one = processor(prompts[0], videos=clip, num_frames=4, video_pool=2)
    assert torch.equal(one["input_ids"][0], got["input_ids"][0][-one["input_ids"].shape[1] :])
    with pytest.raises(InputError, match="videos: got 1 lists for 2 prompts"):
        processor(prompts, videos=[[clip]])
