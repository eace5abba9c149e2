"""Video input: frame sampling in time against a file of known frames, shapes-world clips, frame encoding."""

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import mmlm.processing.video as video_module
from mmlm.data.synthetic.scene import COLORS
from mmlm.data.synthetic.shapes import BACKGROUND
from mmlm.data.synthetic.videos import DIRECTIONS, VIDEO_KINDS, make_video, write_video
from mmlm.errors import InputError
from mmlm.models.vision import VisionConfig, VisionTransformer
from mmlm.processing.image import ImageProcessor
from mmlm.processing.video import encode_frames, read_video, temporal_pool

FPS, N_FRAMES, WIDTH, HEIGHT, BAR = 8, 16, 64, 32, 4


def _bar_frames() -> list[Image.Image]:
    # frame i: black with a white vertical bar at x = BAR·i .. BAR·i + BAR, so its index is readable after coding
    frames = []
    for i in range(N_FRAMES):
        pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        pixels[:, BAR * i : BAR * (i + 1)] = 255
        frames.append(Image.fromarray(pixels))
    return frames


def _bar_index(image: Image.Image) -> int:
    columns = np.asarray(image.convert("L"), np.float32).mean(0)
    return int(round(float(np.flatnonzero(columns > 128).mean()) - (BAR - 1) / 2)) // BAR


@pytest.fixture(scope="module")
def bar_video(tmp_path_factory) -> str:
    return str(write_video(_bar_frames(), tmp_path_factory.mktemp("video") / "bars.mp4", FPS))


def test_the_bar_video_decodes_to_its_frames(bar_video) -> None:
    video = read_video(bar_video, fps=FPS)
    assert [_bar_index(f) for f in video.frames] == list(range(N_FRAMES))
    assert video.duration == pytest.approx(N_FRAMES / FPS) and video.fps == pytest.approx(FPS)
    assert video.frames[0].size == (WIDTH, HEIGHT) and video.frames[0].mode == "RGB"


@pytest.mark.parametrize("sampling", [{"fps": 3.0}, {"num_frames": 4}, {"fps": float(FPS)}])
def test_frames_convert_on_one_thread_so_forked_loader_workers_cannot_hang(bar_video, sampling, monkeypatch):
    # swscale's slice-thread pool hung a DataLoader worker forked after frames had been converted (make test)
    calls = []
    original = av.VideoFrame.to_image

    def to_image(frame, **kwargs):
        calls.append(kwargs)
        return original(frame, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_image", to_image)
    video = read_video(bar_video, **sampling)
    assert video.frames and calls and all(kwargs == {"threads": 1} for kwargs in calls)


@pytest.mark.parametrize("fps", [3.0, 4.0, 2.5, 16.0])
def test_fps_sampling_takes_the_frame_on_screen_at_k_over_fps(bar_video, fps) -> None:
    video = read_video(bar_video, fps=fps)
    count = int(np.ceil(N_FRAMES / FPS * fps))
    assert video.timestamps == pytest.approx([k / fps for k in range(count)])
    # the frame shown at t is the last one that started by t: index floor(t · source fps)
    assert [_bar_index(f) for f in video.frames] == [int(np.floor(t * FPS + 1e-9)) for t in video.timestamps]


def test_num_frames_samples_segment_centres(bar_video) -> None:
    video = read_video(bar_video, num_frames=4)
    duration = N_FRAMES / FPS
    assert video.timestamps == pytest.approx([(i + 0.5) * duration / 4 for i in range(4)])  # 0.25, 0.75, ...
    assert [_bar_index(f) for f in video.frames] == [2, 6, 10, 14]


def test_the_cap_spreads_frames_over_the_whole_video(bar_video) -> None:
    capped = read_video(bar_video, fps=FPS, max_frames=4)
    assert len(capped.frames) == 4
    assert capped.timestamps == pytest.approx([0.0, 5 / FPS, 10 / FPS, 15 / FPS])  # on the k/fps grid
    assert [_bar_index(f) for f in capped.frames] == [0, 5, 10, 15]
    centres = read_video(bar_video, num_frames=64, max_frames=2)
    assert [_bar_index(f) for f in centres.frames] == [4, 12]  # centres of the two halves, not frames 0 and 1


def test_bytes_input_matches_the_path(bar_video) -> None:
    with open(bar_video, "rb") as file:
        from_bytes = read_video(file.read(), num_frames=3)
    assert [_bar_index(f) for f in from_bytes.frames] == [
        _bar_index(f) for f in read_video(bar_video, num_frames=3).frames
    ]


def test_webm_round_trip(tmp_path) -> None:
    if "libvpx-vp9" not in av.codecs_available:
        pytest.skip("this PyAV build has no libvpx-vp9 encoder")
    path = write_video(_bar_frames(), tmp_path / "bars.webm", FPS)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
    video = read_video(path, fps=FPS)
    assert [_bar_index(f) for f in video.frames] == list(range(N_FRAMES))


def test_mp4_is_h264_yuv420p(bar_video) -> None:
    with av.open(bar_video) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.frames == N_FRAMES


# ---- shapes-world clips ----


def _centroid(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, np.int32)
    ys, xs = np.nonzero(np.abs(pixels - np.array(BACKGROUND)).sum(-1) > 60)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("seed", range(8))
def test_motion_direction_is_recoverable_from_the_frames(seed, tmp_path) -> None:
    sample = make_video("move", seed)
    frames = read_video(
        write_video(sample.frames, tmp_path / "move.mp4", 8), fps=8
    ).frames  # after coding too
    for clip in (sample.frames, frames):
        steps = np.diff([_centroid(f) for f in clip], axis=0)  # [T-1, 2] (dx, dy) in pixels
        expected = np.array(DIRECTIONS[sample.answer])
        assert (steps @ expected > 0.5).all()  # every step goes the answer's way
        assert np.abs(steps @ expected[::-1]).max() < 0.5  # and none sideways
    assert sample.answer in sample.caption and sample.question.endswith("move?")


def _colors_present(image: Image.Image) -> set[str]:
    pixels = np.asarray(image, np.int32).reshape(-1, 3)
    return {name for name, rgb in COLORS.items() if (np.abs(pixels - rgb).sum(-1) < 10).sum() > 20}


@pytest.mark.parametrize("seed", range(6))
def test_event_answers_match_captions_and_pixels(seed) -> None:
    appear = make_video("appear", seed)
    color = appear.answer.split()[0]
    assert appear.answer in appear.caption and appear.caption.index(appear.answer) > appear.caption.index(
        "then"
    )
    assert color not in _colors_present(appear.frames[0]) and color in _colors_present(appear.frames[-1])

    gone = make_video("disappear", seed)
    color = gone.answer.split()[0]
    assert f"the {gone.answer.split()[1]} disappears" in gone.caption
    assert color in _colors_present(gone.frames[0]) and color not in _colors_present(gone.frames[-1])

    turn = make_video("color", seed)
    assert turn.caption.split(" at ")[0].endswith(f"turns {turn.answer}")
    before = turn.caption.split()[1]
    assert _colors_present(turn.frames[0]) == {before} and _colors_present(turn.frames[-1]) == {turn.answer}


def test_clips_are_deterministic_and_kinds_checked() -> None:
    for kind in VIDEO_KINDS:
        first, second = make_video(kind, 3, frames=8, size=32), make_video(kind, 3, frames=8, size=32)
        assert first[1:] == second[1:] and len(first.frames) == 8 and first.frames[0].size == (32, 32)
        assert [f.tobytes() for f in first.frames] == [f.tobytes() for f in second.frames]
    with pytest.raises(InputError, match="kind: got 'spin'"):
        make_video("spin", 0)


def test_write_video_rejects_odd_sizes_and_unknown_suffixes(tmp_path) -> None:
    frames = [Image.new("RGB", (33, 32))]
    with pytest.raises(InputError, match="33x32.*even"):
        write_video(frames, tmp_path / "odd.mp4", 8)
    with pytest.raises(InputError, match=r"\.avi"):
        write_video([Image.new("RGB", (32, 32))], tmp_path / "clip.avi", 8)


# ---- encoding ----


def test_encode_frames_equals_per_frame_encoding() -> None:
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=None)
    vision = VisionTransformer(cfg).eval()
    processor = ImageProcessor.clip(32)
    frames = make_video("move", 0, frames=5, size=32).frames
    tokens = encode_frames(vision, processor, frames, batch_size=2)  # batches of 2, 2, 1
    assert tokens.shape == (5, cfg.grid**2 + 1, 32)
    with torch.no_grad():
        each = torch.cat([vision.forward_features(processor([f]))[0] for f in frames])
    torch.testing.assert_close(tokens, each, atol=1e-5, rtol=1e-5)


def test_temporal_pool_means_groups_with_a_partial_last_group() -> None:
    features = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 2, 3)  # frame t holds t
    pooled = temporal_pool(features, 2)
    assert pooled.shape == (3, 2, 3)
    assert pooled[:, 0, 0].tolist() == [0.5, 2.5, 4.0]
    assert torch.equal(temporal_pool(features, 1), features)
    with pytest.raises(InputError, match="group: got 0"):
        temporal_pool(features, 0)


# ---- bad input ----


def test_bad_files_raise_one_line_input_errors(tmp_path, bar_video) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(Path(bar_video).read_bytes()[:600])
    audio = tmp_path / "tone.wav"
    with wave.open(str(audio), "wb") as file:
        file.setnchannels(1), file.setsampwidth(2), file.setframerate(16000)
        file.writeframes((np.sin(np.arange(16000) / 5) * 8000).astype(np.int16).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    no_frames = tmp_path / "no_frames.y4m"  # a valid header, a video stream, zero frames
    no_frames.write_bytes(b"YUV4MPEG2 W64 H64 F8:1 Ip A1:1 C420jpeg\n")
    cases = [
        (corrupt, "corrupt.mp4: not a readable video"),
        (truncated, "truncated.mp4: not a readable video"),
        (audio, "tone.wav: has no video stream"),
        (tmp_path / "missing.mp4", "missing.mp4: file not found"),
        (empty, r"empty.mp4: file is empty \(0 bytes\)"),
        (no_frames, "no_frames.y4m: has a video stream with no frames"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message) as error:
            read_video(path, fps=1)
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="<bytes>: got 0 bytes"):
        read_video(b"", fps=1)


def test_sampling_arguments_are_checked(bar_video) -> None:
    with pytest.raises(InputError, match="expected exactly one of them"):
        read_video(bar_video)
    with pytest.raises(InputError, match="expected exactly one of them"):
        read_video(bar_video, fps=1, num_frames=4)
    with pytest.raises(InputError, match="fps=0"):
        read_video(bar_video, fps=0)
    with pytest.raises(InputError, match="num_frames=0"):
        read_video(bar_video, num_frames=0)


# ---- long videos: duration cap, seeking ----

BITS, LONG_FRAMES, GOP = 8, 96, 8  # 12 s at 8 fps, a keyframe every second


def _binary_frames(count: int) -> list[Image.Image]:
    # frame i: 8 blocks of 8 px, block b white when bit b of i is set, so its index is readable after coding
    frames = []
    for i in range(count):
        pixels = np.zeros((16, 8 * BITS, 3), np.uint8)
        for b in range(BITS):
            pixels[:, 8 * b : 8 * (b + 1)] = 255 * ((i >> b) & 1)
        frames.append(Image.fromarray(pixels))
    return frames


def _binary_index(image: Image.Image) -> int:
    blocks = np.asarray(image.convert("L"), np.float32).reshape(16, BITS, 8).mean((0, 2))
    return sum(1 << b for b in range(BITS) if blocks[b] > 128)


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "gop8.mp4"
    return str(write_video(_binary_frames(LONG_FRAMES), path, FPS, keyframe_interval=GOP))


def _count_seeks(monkeypatch) -> list[float]:
    seeks: list[float] = []
    real = video_module._seek

    def counting(container, stream, time):
        seeks.append(time)
        real(container, stream, time)

    monkeypatch.setattr(video_module, "_seek", counting)
    return seeks


def test_the_gop_clip_has_a_keyframe_every_second(gop_video) -> None:
    with av.open(gop_video) as container:
        keys = [p.pts * p.time_base for p in container.demux(video=0) if p.is_keyframe and p.pts is not None]
    assert sorted(keys) == [k for k in range(LONG_FRAMES // FPS)]


@pytest.mark.parametrize(
    "sampling", [{"fps": 0.3}, {"fps": 0.25, "max_frames": 2}, {"num_frames": 3}, {"num_frames": 5}]
)
def test_seeking_returns_the_sequential_frames_bit_for_bit(gop_video, sampling, monkeypatch) -> None:
    sequential = read_video(gop_video, seek=False, **sampling)
    seeks = _count_seeks(monkeypatch)
    seeked = read_video(gop_video, **sampling)
    assert seeks  # the sampled times are > 2 s apart, so the reader jumped
    assert seeked.timestamps == sequential.timestamps
    assert [f.tobytes() for f in seeked.frames] == [f.tobytes() for f in sequential.frames]
    # and both are the frame on screen at t: index floor(t · source fps)
    assert [_binary_index(f) for f in seeked.frames] == [
        int(np.floor(t * FPS + 1e-9)) for t in seeked.timestamps
    ]


def test_close_sampling_times_decode_forward_without_seeking(gop_video, monkeypatch) -> None:
    seeks = _count_seeks(monkeypatch)
    video = read_video(gop_video, fps=1)  # 1 s apart: under SEEK_GAP_SECONDS
    assert seeks == [] and [_binary_index(f) for f in video.frames] == [8 * k for k in range(12)]


def test_a_clip_with_one_keyframe_is_seeked_into_once(tmp_path, monkeypatch) -> None:
    path = write_video(_binary_frames(LONG_FRAMES), tmp_path / "one_gop.mp4", FPS)  # libx264's GOP is 250
    seeks = _count_seeks(monkeypatch)
    video = read_video(path, num_frames=4)  # 1.5, 4.5, 7.5, 10.5 s
    # the seek for 4.5 s lands on frame 0, already decoded: the later gaps are decoded forward instead
    assert len(seeks) == 1
    assert [_binary_index(f) for f in video.frames] == [12, 36, 60, 84]


def test_a_failed_seek_falls_back_to_sequential_decoding(gop_video, monkeypatch) -> None:
    def cannot_seek(container, stream, time):
        raise video_module._CannotSeek

    monkeypatch.setattr(video_module, "_seek", cannot_seek)
    video = read_video(gop_video, num_frames=3)
    assert [_binary_index(f) for f in video.frames] == [16, 48, 80]


def test_bytes_input_seeks_like_the_path(gop_video) -> None:
    with open(gop_video, "rb") as file:
        from_bytes = read_video(file.read(), num_frames=5)
    from_path = read_video(gop_video, num_frames=5)
    assert [f.tobytes() for f in from_bytes.frames] == [f.tobytes() for f in from_path.frames]


@pytest.fixture(scope="module")
def two_hour_video(tmp_path_factory) -> Path:
    # two 16×16 frames one hour apart: a 1.5 kB file whose header says 7200 s
    path = tmp_path_factory.mktemp("video") / "two_hours.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(1, 3600))
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_an_enormous_duration_is_refused_before_decoding(two_hour_video, monkeypatch) -> None:
    def no_decoding(*args):
        raise AssertionError("decoded a frame of a video over the cap")

    with monkeypatch.context() as patch:
        patch.setattr(video_module, "_decode_with_seeks", no_decoding)
        patch.setattr(video_module, "_decode_sequentially", no_decoding)
        with pytest.raises(
            InputError, match=r"two_hours.mp4: lasts 7200.0 s, over the max_seconds=3600 s cap"
        ) as error:
            read_video(two_hour_video, num_frames=8)
    assert "\n" not in str(error.value) and "pass a larger max_seconds" in str(error.value)
    video = read_video(two_hour_video, num_frames=2, max_seconds=None)  # 1800 s and 5400 s
    assert video.duration == pytest.approx(7200)
    assert [int(np.asarray(f).mean() > 100) for f in video.frames] == [0, 1]


def test_a_small_cap_refuses_an_ordinary_clip(bar_video) -> None:
    with pytest.raises(InputError, match=r"bars.mp4: lasts 2.0 s, over the max_seconds=1.5 s cap") as error:
        read_video(bar_video, fps=1, max_seconds=1.5)
    assert "\n" not in str(error.value)
    assert len(read_video(bar_video, fps=1, max_seconds=2.0).frames) == 2  # at the cap is allowed
    with pytest.raises(InputError, match="max_seconds=0"):
        read_video(bar_video, fps=1, max_seconds=0)
