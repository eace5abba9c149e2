"""Retrieval metrics at scale: mmlm's chunked recall@K / ranks against CLIP_benchmark's full-matrix recipe.

CLIP_benchmark scores every text against every image at once and builds a one-hot [batch, K, images]
tensor per batch; mmlm scores a bounded number of queries at a time. Both run on the same embeddings
(clustered, so recall is neither 0 nor 1), each measurement in a fresh process so that its peak RSS is its
own, in --rounds interleaved rounds that reverse the order every round (timing.py). The run reports each
side's seconds (median, min, max), peak RSS, the ratio of median times, checks the recalls agree, then runs
mmlm alone once at a size whose full score matrix would not fit in memory (--big-images 0 skips it).

    .venv/bin/python benchmarks/bench_retrieval_metrics.py [--images 5000 --captions 5 --big-images 20000 --rounds 3]
    .venv/bin/python benchmarks/bench_retrieval_metrics.py --quick    # 300 images, 1 round: checks that it runs
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from timing import alternating_rounds, ratio_of_medians, spread

SIDES = ("clip_benchmark", "mmlm")


def embeddings(n_images: int, captions: int, dim: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    text_to_image = torch.arange(n_images).repeat_interleave(captions)
    noise = torch.randn(len(text_to_image), dim, generator=g)
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.3 * noise, dim=-1)
    return images, texts, text_to_image.tolist()


def run(which: str, n_images: int, captions: int) -> dict:
    images, texts, text_to_image = embeddings(n_images, captions)
    # imports first, so the timed span is the metric alone
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    from mmlm.eval.retrieval import retrieval_metrics

    started = time.perf_counter()
    if which == "mmlm":
        out = retrieval_metrics(images, texts, text_to_image)
        recall = {k: out[k] for k in ("image_to_text_R@1", "text_to_image_R@1", "text_to_image_R@5")}
    else:
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
    return {"method": which, "images": n_images, "texts": n_images * captions, "seconds": round(seconds, 4),
            "peak_rss_mb": round(peak_mb), **recall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--big-images", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the two sides")
    parser.add_argument("--quick", action="store_true", help="300 images, 1 round: a check that it runs")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one measurement per process, so peak RSS is its own
        print(json.dumps(run(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    if args.quick:
        args.images, args.big_images, args.rounds = 300, 600, 1

    def measure(which: str, n: int):
        def in_fresh_process() -> dict:
            cmd = [sys.executable, __file__, "--worker", which, str(n), str(args.captions)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)
            return json.loads(out.strip().splitlines()[-1])

        return in_fresh_process

    results = alternating_rounds({side: measure(side, args.images) for side in SIDES}, args.rounds)
    seconds = {side: [r["seconds"] for r in results[side]] for side in SIDES}
    ref, ours = results["clip_benchmark"][0], results["mmlm"][0]
    same = all(abs(ref[k] - ours[k]) < 1e-6 for k in ref if "R@" in k)
    print(json.dumps({
        "images": args.images, "texts": args.images * args.captions, "rounds": args.rounds, "same_recall": same,
        "seconds": {side: spread(s, 3) for side, s in seconds.items()},
        "peak_rss_mb": {side: spread([r["peak_rss_mb"] for r in results[side]], 0) for side in SIDES},
        "time_ratio_clip_benchmark_over_mmlm": ratio_of_medians(seconds["clip_benchmark"], seconds["mmlm"], 2),
    }), flush=True)  # fmt: skip
    if args.big_images:
        big = measure("mmlm", args.big_images)()
        full = big["images"] * big["texts"] * 4 / 2**20
        print(f"{big['images']}x{big['texts']} (one run): full score matrix would be {full:.0f} MB; "
              f"mmlm {big['seconds']} s, peak RSS {big['peak_rss_mb']} MB")  # fmt: skip


if __name__ == "__main__":
    main()
