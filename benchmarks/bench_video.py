"""Video input speed on CPU: frames decoded per second by PyAV, and frames encoded per second by a small ViT.

The script writes a 256×256 H.264 MP4 of shapes-world "move" clips (libx264, yuv420p, 30 fps) to a temporary
folder, then times:

- decode: `read_video(path, fps=30)`, every frame decoded and converted to an RGB PIL image;
- sparse decode: `read_video(path, num_frames=16)`, which still decodes every frame (no seeking) but converts 16;
- encode: `encode_frames` with a ViT-Ti/16-shaped tower (224 px, width 192, 12 layers, 3 heads), CLIP
  preprocessing of the 256 px frames, batch 32.

Each figure is the median over rounds after one untimed round.

    .venv/bin/python benchmarks/bench_video.py [--frames 300] [--encode-frames 64] [--rounds 3] [--threads N]
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import av
import torch
from timing import median_seconds

from mmlm.config import VisionConfig
from mmlm.data.videos import make_video, write_video
from mmlm.encoders.vision import VisionTransformer
from mmlm.processing.image import ImageProcessor
from mmlm.processing.video import encode_frames, read_video

VIT_TINY = VisionConfig(
    image_size=224, patch_size=16, width=192, layers=12, heads=3, mlp_dim=768, embed_dim=None
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames in the test MP4 (30 fps)")
    parser.add_argument("--encode-frames", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
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
        decode_s = median_seconds(lambda: read_video(path, fps=30, max_frames=args.frames), args.rounds)
        sparse_s = median_seconds(lambda: read_video(path, num_frames=16), args.rounds)

    torch.manual_seed(0)
    vision = VisionTransformer(VIT_TINY).eval()
    processor = ImageProcessor.clip(224)
    to_encode = frames[: args.encode_frames]
    encode_s = median_seconds(lambda: encode_frames(vision, processor, to_encode, batch_size=32), args.rounds)

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
                "decode_frames_per_s": round(args.frames / decode_s, 1),
                "sparse_decode_frames_per_s": round(args.frames / sparse_s, 1),  # all decoded, 16 kept
                "encode_frames_per_s": round(len(to_encode) / encode_s, 1),
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
