"""Video input speed on CPU: frames decoded per second by PyAV, and frames encoded per second by a small ViT.

The script writes a 256×256 H.264 MP4 of shapes-world "move" clips (libx264, yuv420p, 30 fps) to a temporary
folder, then times:

- decode: `read_video(path, fps=30)`, every frame decoded and converted to an RGB PIL image;
- sparse decode: `read_video(path, num_frames=16)`, which still decodes every frame (its sampled times are
  under 2 s apart, so it does not seek) but converts 16;
- long clip: 8 frames uniformly (`num_frames=8`) from a separate --long-seconds clip (128×128, 30 fps, a
  keyframe every --long-gop frames), decoding every frame up to the last sampled time (`seek=False`) versus
  seeking to the keyframe before each sampled time; the frames are checked equal;
- encode: `encode_frames` with a ViT-Ti/16-shaped tower (224 px, width 192, 12 layers, 3 heads), CLIP
  preprocessing of the 256 px frames, batch 32.

The pairs that are compared (every frame against 16 kept; sequential against seeking) run in interleaved
rounds that reverse the order every round (timing.py), after one untimed call each; every figure is the
median with its min and max over rounds, and each pair's ratio is the ratio of median times.

    .venv/bin/python benchmarks/bench_video.py [--frames 300] [--encode-frames 64] [--rounds 3] [--threads N]
        [--long-seconds 90] [--long-gop 60]
    .venv/bin/python benchmarks/bench_video.py --quick     # tiny clips, 1 round: checks that it runs
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from timing import interleaved_seconds, rate_spread, ratio_of_medians, spread

from mmlm.data.synthetic.videos import make_video, write_video
from mmlm.models.vision import VisionConfig, VisionTransformer
from mmlm.processing.image import ImageProcessor
from mmlm.processing.video import encode_frames, read_video

VIT_TINY = VisionConfig(
    image_size=224, patch_size=16, width=192, layers=12, heads=3, mlp_dim=768, embed_dim=None
)


def _long_frames(count: int) -> list[Image.Image]:
    # a square that crosses the frame every 2 s over a slowly shifting gradient: every frame differs, as in
    # real footage, so P-frames carry data and decoding each one costs something
    ramp = np.linspace(0, 255, 128, dtype=np.float32)
    frames = []
    for i in range(count):
        pixels = np.empty((128, 128, 3), np.uint8)
        pixels[..., 0] = (ramp[None, :] + 2 * i) % 256
        pixels[..., 1] = (ramp[:, None] + i) % 256
        pixels[..., 2] = 64
        x = int(i * 112 / 60) % 112
        pixels[40:56, x : x + 16] = 255
        frames.append(Image.fromarray(pixels))
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames in the test MP4 (30 fps)")
    parser.add_argument("--encode-frames", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--long-seconds", type=int, default=90, help="length of the long clip (30 fps)")
    parser.add_argument("--long-gop", type=int, default=60, help="frames between the long clip's keyframes")
    parser.add_argument("--quick", action="store_true", help="tiny clips, 1 round: a check that it runs")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.encode_frames, args.rounds, args.long_seconds = 30, 4, 1, 6
    if args.threads:
        torch.set_num_threads(args.threads)

    frames = []
    seed = 0
    while len(frames) < args.frames:
        frames += make_video("move", seed, frames=30, size=256).frames
        seed += 1
    frames = frames[: args.frames]
    with tempfile.TemporaryDirectory() as folder:
        path = write_video(frames, Path(folder) / "clip.mp4", 30)
        size = path.stat().st_size
        decode_s = interleaved_seconds(
            {
                "every_frame": lambda: read_video(path, fps=30, max_frames=args.frames),
                "keep_16": lambda: read_video(path, num_frames=16),
            },
            args.rounds,
        )
        long_path = write_video(
            _long_frames(args.long_seconds * 30), Path(folder) / "long.mp4", 30, args.long_gop
        )
        long_size = long_path.stat().st_size
        sequential = read_video(long_path, num_frames=8, seek=False)
        seeking = read_video(long_path, num_frames=8)
        assert [f.tobytes() for f in sequential.frames] == [f.tobytes() for f in seeking.frames]
        long_s = interleaved_seconds(
            {
                "sequential": lambda: read_video(long_path, num_frames=8, seek=False),
                "seeking": lambda: read_video(long_path, num_frames=8),
            },
            args.rounds,
        )

    torch.manual_seed(0)
    vision = VisionTransformer(VIT_TINY).eval()
    processor = ImageProcessor.clip(224)
    to_encode = frames[: args.encode_frames]
    encode_s = interleaved_seconds(
        {"encode": lambda: encode_frames(vision, processor, to_encode, batch_size=32)}, args.rounds
    )["encode"]

    print(
        json.dumps(
            {
                "video": {
                    "frames": args.frames,
                    "size": "256x256",
                    "fps": 30,
                    "codec": "h264",
                    "bytes": size,
                },
                "rounds": args.rounds,
                "decode_frames_per_s": rate_spread(decode_s["every_frame"], args.frames),
                # every frame decoded, 16 converted to RGB
                "sparse_decode_frames_per_s": rate_spread(decode_s["keep_16"], args.frames),
                "sparse_speedup": ratio_of_medians(decode_s["every_frame"], decode_s["keep_16"], 1),
                "long_video": {
                    "seconds": args.long_seconds,
                    "size": "128x128",
                    "fps": 30,
                    "keyframe_every": args.long_gop,
                    "bytes": long_size,
                },
                "long_8_frames_sequential_ms": spread([1000 * s for s in long_s["sequential"]], 1),
                "long_8_frames_seeking_ms": spread([1000 * s for s in long_s["seeking"]], 1),
                "long_seeking_speedup": ratio_of_medians(long_s["sequential"], long_s["seeking"], 1),
                "encode_frames_per_s": rate_spread(encode_s, len(to_encode)),
                "encoder": "ViT-Ti/16 shape, 224 px, random weights, fp32, batch 32",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "av": av.__version__,
                "ffmpeg": ".".join(map(str, av.library_versions["libavcodec"])),
                "machine": platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
