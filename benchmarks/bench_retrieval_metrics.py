"""Retrieval metrics at scale: mmlm's chunked recall@K / ranks against CLIP_benchmark's full-matrix recipe.

CLIP_benchmark scores every text against every image at once and builds a one-hot [batch, K, images]
tensor per batch; mmlm scores a bounded number of queries at a time. The run reports time and peak RSS of
each on the same embeddings (clustered, so recall is neither 0 nor 1), checks the numbers agree, then runs
mmlm alone at a size whose full score matrix would not fit in memory.

    .venv/bin/python benchmarks/bench_retrieval_metrics.py [--images 5000 --captions 5 --big-images 20000]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def embeddings(n_images: int, captions: int, dim: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    text_to_image = torch.arange(n_images).repeat_interleave(captions)
    noise = torch.randn(len(text_to_image), dim, generator=g)
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.3 * noise, dim=-1)
    return images, texts, text_to_image.tolist()


def run(which: str, n_images: int, captions: int) -> dict:
    images, texts, text_to_image = embeddings(n_images, captions)
    started = time.perf_counter()
    if which == "mmlm":
        from mmlm.eval.retrieval import retrieval_metrics

        out = retrieval_metrics(images, texts, text_to_image)
        recall = {k: out[k] for k in ("image_to_text_R@1", "text_to_image_R@1", "text_to_image_R@5")}
    else:
        from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

        scores = texts @ images.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[torch.arange(len(scores)), text_to_image] = True
        recall = {
            "image_to_text_R@1": (batchify(recall_at_k, scores.T, positive.T, 256, "cpu", k=1) > 0).float().mean().item(),
            "text_to_image_R@1": (batchify(recall_at_k, scores, positive, 256, "cpu", k=1) > 0).float().mean().item(),
            "text_to_image_R@5": (batchify(recall_at_k, scores, positive, 256, "cpu", k=5) > 0).float().mean().item(),
        }  # fmt: skip
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": which, "images": n_images, "texts": n_images * captions, "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_mb), **recall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--big-images", type=int, default=20000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one measurement per process, so peak RSS is its own
        print(json.dumps(run(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    results = []
    for which, n in (("clip_benchmark", args.images), ("mmlm", args.images), ("mmlm", args.big_images)):
        cmd = [sys.executable, __file__, "--worker", which, str(n), str(args.captions)]
        line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(line, flush=True)
    ref, ours = results[0], results[1]
    same = all(abs(ref[k] - ours[k]) < 1e-6 for k in ref if "R@" in k)
    print(f"same recall: {same}; time ratio clip_benchmark/mmlm {ref['seconds'] / ours['seconds']:.2f}x; "
          f"peak RSS ratio {ref['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x")  # fmt: skip
    big = results[2]
    full = big["images"] * big["texts"] * 4 / 2**20
    print(
        f"{big['images']}x{big['texts']}: full score matrix would be {full:.0f} MB; mmlm peak RSS {big['peak_rss_mb']} MB"
    )


if __name__ == "__main__":
    main()
