"""Embedding search on CPU: FAISS exact, FAISS IVF and numpy brute force, plus `mmlm index build` images/s.

Vectors: N unit vectors in D dimensions drawn from a mixture of K Gaussian clusters (random unit centres,
log-normal cluster weights, isotropic noise of norm about `spread` before renormalising), so nearest
neighbours are real structure rather than the near-ties of uniform random vectors. Queries are fresh draws
from the same mixture. Exact top-10 for every query comes from FAISS IndexFlatIP.

Latency is single-query: one query per call, timed one by one. Every comparison runs in --repeats
interleaved rounds, the order of the sides reversing every round (benchmarks/timing.py): the three search
methods' single-query passes and batched searches, and `mmlm index build` against encode_image alone. Each
method reports the median over rounds of its p50 and p99 with their min-max spread, and speed-ups are ratios
of medians. IVF's nprobe is tuned on separate queries (the smallest value in a fixed ladder whose recall@10
reaches the target) and then measured on the evaluation queries.

    python benchmarks/bench_index.py                      # 1M x 512, 10k clusters (several minutes)
    python benchmarks/bench_index.py --n 100000 --clusters 1000 --index-images 60   # quick look
    python benchmarks/bench_index.py --quick     # 2,000 x 32, 8 images: checks that it runs
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from timing import alternating_rounds, interleaved_seconds, rate_spread, ratio_of_medians, spread

NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def rss_bytes() -> int:
    """Return this process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def mixture(dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return unit cluster centres [K, D] and mixture weights [K] (log-normal, so cluster sizes vary)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 0.5, clusters)
    return centres, weights / weights.sum()


def draw(
    centres: np.ndarray, weights: np.ndarray, n: int, spread: float, seed: int, chunk: int = 1 << 16
) -> np.ndarray:
    """Return n unit vectors [n, D] drawn from the mixture."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x *= spread / np.sqrt(dim)
        x += centres[rng.choice(len(centres), stop - start, p=weights)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Return mean |found ∩ exact| / k over query rows."""
    k = exact.shape[1]
    return float(
        np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact, strict=True)])
    )


def latency_pass(
    search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """Return the p50 and p99 latency (ms) of one query per call over `queries`, and the ids found [Q, k]."""
    times, found = [], []
    for q in queries:
        start = time.perf_counter_ns()
        found.append(search(q[None]))
        times.append((time.perf_counter_ns() - start) / 1e6)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), np.concatenate(found)


def interleaved_latency(methods: dict[str, tuple[Callable, np.ndarray]], rounds: int) -> dict[str, dict]:
    """Return each method's p50/p99 (median over rounds, with spread) and ids found, timed in alternating rounds."""
    for search, queries in methods.values():
        search(queries[:1])  # warm caches and thread pools
    passes = alternating_rounds(
        {
            name: (lambda s=search, q=queries: latency_pass(s, q))
            for name, (search, queries) in methods.items()
        },
        rounds,
    )
    return {
        name: {
            "p50_ms": round(statistics.median(p[0] for p in runs), 4), "p99_ms": round(statistics.median(p[1] for p in runs), 4),
            "p50_ms_spread": spread([p[0] for p in runs], 3), "p99_ms_spread": spread([p[1] for p in runs], 3),
            "p50_ms_runs": [p[0] for p in runs], "found": runs[-1][2],
        }
        for name, runs in passes.items()
    }  # fmt: skip


def numpy_top_k(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1 << 17) -> np.ndarray:
    """Return top-k ids [Q, k] by inner product: chunked matmul, argpartition per chunk, merged."""
    best_ids = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(x), chunk):
        scores = queries @ x[start : start + chunk].T  # [Q, chunk]
        top = (
            np.argpartition(-scores, k, axis=1)[:, :k] if scores.shape[1] > k else np.argsort(-scores, axis=1)
        )
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
        best_scores, best_ids = (
            np.take_along_axis(best_scores, keep, 1),
            np.take_along_axis(best_ids, keep, 1),
        )
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_ids, order, 1)


def emit(row: dict) -> dict:
    """Print one JSON line (without bulky fields) and return the row."""
    print(json.dumps({k: v for k, v in row.items() if k not in ("found", "p50_ms_runs")}), flush=True)
    return row


def bench_search(args: argparse.Namespace) -> list[dict]:
    """Time numpy brute force, FAISS flat and FAISS IVF on the clustered vectors; return one row per method.

    The three methods are built first and then timed in interleaved rounds, the order reversing every round
    (timing.py), so drift on a shared machine lands on every method alike. That keeps all three in memory at
    once: about 3·4·N·D bytes (6 GB at the 1M x 512 default).
    """
    k = 10
    centres, weights = mixture(args.dim, args.clusters, args.seed)
    start = time.perf_counter()
    x = draw(centres, weights, args.n, args.spread, args.seed + 1)
    generate_s = time.perf_counter() - start
    queries = draw(centres, weights, args.queries + args.tune_queries, args.spread, args.seed + 2)
    evaluate, tune = queries[: args.queries], queries[args.queries :]
    timed, slow_timed = evaluate[: args.latency_queries], evaluate[: args.slow_latency_queries]
    batch = evaluate[: args.batch_queries]
    print(json.dumps({"data": "clustered", "n": args.n, "dim": args.dim, "clusters": args.clusters,
                      "spread": args.spread, "generate_s": round(generate_s, 1), "rounds": args.repeats,
                      "loadavg_start": os.getloadavg()[0]}), flush=True)  # fmt: skip

    before = rss_bytes()
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    flat_build, flat_rss = time.perf_counter() - start, rss_bytes() - before
    start = time.perf_counter()
    _, exact = flat.search(queries, k)  # batched: BLAS
    exact_s = time.perf_counter() - start
    exact_eval, exact_tune = exact[: args.queries], exact[args.queries :]
    ivf, ivf_row = build_ivf(args, x, tune, exact_tune, k)

    methods = {
        "faiss_flat": (lambda q: flat.search(q, k)[1], slow_timed),
        "numpy_brute_force": (lambda q: numpy_top_k(x, q, k, chunk=len(x)), slow_timed),
        "faiss_ivf": (lambda q: ivf.search(q, k)[1], timed),
    }
    latency = interleaved_latency(methods, args.repeats)
    batched = interleaved_seconds(
        {"faiss_flat": lambda: flat.search(batch, k), "numpy_brute_force": lambda: numpy_top_k(x, batch, k),
         "faiss_ivf": lambda: ivf.search(batch, k)}, args.repeats,
    )  # fmt: skip
    base_p50 = latency["numpy_brute_force"]["p50_ms_runs"]
    extra = {
        "faiss_flat": {"build_s": round(flat_build, 2), "index_bytes": int(flat.ntotal) * args.dim * 4,
                       "rss_delta_bytes": flat_rss, "exact_ground_truth_s": round(exact_s, 1)},
        "numpy_brute_force": {"build_s": 0.0, "index_bytes": x.nbytes, "rss_delta_bytes": 0},
        "faiss_ivf": ivf_row,
    }  # fmt: skip
    rows = []
    for name, (_, method_queries) in methods.items():
        lat, qps = latency[name], rate_spread(batched[name], len(batch))
        recall = recall_at_k(lat["found"], exact_eval[: len(method_queries)])
        if name == "faiss_ivf":  # recall over every evaluation query, batched
            recall = recall_at_k(ivf.search(evaluate, k)[1], exact_eval)
        rows.append(emit({
            "method": name, **extra[name], "recall_at_10": recall, "latency_queries": len(method_queries),
            "batched_qps": qps["median"], "batched_qps_spread": qps, **lat,
            "p50_speedup_vs_numpy": ratio_of_medians(base_p50, lat["p50_ms_runs"]),
        }))  # fmt: skip
    return rows


def build_ivf(
    args: argparse.Namespace, x: np.ndarray, tune: np.ndarray, exact_tune: np.ndarray, k: int
) -> tuple[faiss.Index, dict]:
    """Return an IVF index over `x` with nprobe tuned on `tune` to the target recall, and its build facts."""
    before = rss_bytes()
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(args.dim)
    ivf = faiss.IndexIVFFlat(quantizer, args.dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter, ivf.cp.seed = args.niter, args.seed
    sample = np.random.default_rng(args.seed).choice(
        args.n, min(args.n, args.train_per_list * args.nlist), replace=False
    )
    ivf.train(x[np.sort(sample)])
    train_s = time.perf_counter() - start
    ivf.add(x)
    ivf_build, ivf_rss = time.perf_counter() - start, rss_bytes() - before
    tuning = {}
    for nprobe in NPROBE_LADDER:
        if nprobe > args.nlist:
            break
        ivf.nprobe = nprobe
        tuning[nprobe] = recall_at_k(ivf.search(tune, k)[1], exact_tune)
        if tuning[nprobe] >= args.target_recall:
            break
    ivf.nprobe = nprobe
    return ivf, {
        "nlist": args.nlist, "nprobe": nprobe, "build_s": round(ivf_build, 2), "train_s": round(train_s, 2),
        "index_bytes": int(ivf.ntotal) * (args.dim * 4 + 8) + args.nlist * args.dim * 4,
        "rss_delta_bytes": ivf_rss, "recall_queries": args.queries,
        "tuning_recall": {str(p): round(r, 4) for p, r in tuning.items()},
    }  # fmt: skip


def photos(count: int, folder: Path, seed: int) -> list[Path]:
    """Write `count` distinct JPEGs: random crops and scales of scikit-image's sample photographs."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [
        getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    ]
    paths = []
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)])
        w, h = image.size
        left, top = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        crop = image.crop((left, top, left + int(w * 0.6), top + int(h * 0.6)))
        crop = crop.resize((480, 360)).rotate(float(rng.uniform(-10, 10)))
        paths.append(folder / f"photo_{i:04d}.jpg")
        crop.save(paths[-1], quality=88)
    return paths


def small_clip(folder: Path) -> None:
    """Write a small random CLIP (ViT 4 layers x 256 wide, 224 px, patch 32; 512-dim embeddings)."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_text import write_clip_tokenizer

    tok_dir, vocab = write_clip_tokenizer(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )  # fmt: skip
    transformers.CLIPModel(cfg).save_pretrained(folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)  # fmt: skip


def bench_index_build(count: int, batch_size: int, seed: int, rounds: int) -> dict:
    """Time `mmlm index build` over `count` JPEGs with a small model against encode_image alone, in alternating rounds."""
    import mmlm
    from mmlm.index import build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model").mkdir()
        (root / "photos").mkdir()
        small_clip(root / "model")
        paths = photos(count, root / "photos", seed)
        model = mmlm.load(root / "model")
        model.encode_image([paths[0]])  # warm-up
        fresh = iter(range(rounds))  # each round builds a new index: a rebuild would skip every image
        reports = []

        def build() -> None:
            reports.append(
                build_index(model, root / "model", root / "photos", root / f"index{next(fresh)}", batch_size)
            )

        seconds = interleaved_seconds(
            {"encode_only": lambda: model.encode_image(paths, batch_size), "index_build": build},
            rounds,
            warmup=0,
        )
        start = time.perf_counter()
        again = build_index(model, root / "model", root / "photos", root / "index0", batch_size)
        rerun_s = time.perf_counter() - start
        digest = hashlib.sha256(b"".join(p.read_bytes()[:64] for p in paths)).hexdigest()[:8]
    build_rate, encode_rate = (
        rate_spread(seconds["index_build"], count),
        rate_spread(seconds["encode_only"], count),
    )
    return emit({
        "method": "mmlm_index_build", "images": count, "batch_size": batch_size, "rounds": rounds,
        "added": reports[0].added, "images_per_s": build_rate["median"], "images_per_s_spread": build_rate,
        "encode_only_images_per_s": encode_rate["median"], "encode_only_spread": encode_rate,
        "build_over_encode_time": ratio_of_medians(seconds["index_build"], seconds["encode_only"]),
        "rerun_s": round(rerun_s, 2), "rerun_added": again.added, "photos_digest": digest,
    })  # fmt: skip


def ratio_table(rows: list[dict]) -> str:
    """Return a markdown table of the search rows (medians over rounds), with speed-ups over numpy brute force."""
    lines = [
        "| method | p50 ms | p99 ms | p50 speed-up vs numpy | recall@10 | build s | index MB | batched q/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']}{' nprobe=' + str(r['nprobe']) if 'nprobe' in r else ''} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['p50_speedup_vs_numpy']:.1f}x | {r['recall_at_10']:.4f} | "
            f"{r['build_s']:.1f} | {r['index_bytes'] / 2**20:.0f} | {r.get('batched_qps', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print JSON lines and a ratio table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=10_000, help="Gaussian clusters in the mixture")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm relative to a unit centre")
    p.add_argument("--queries", type=int, default=1000, help="evaluation queries (recall)")
    p.add_argument("--tune-queries", type=int, default=300, help="queries that tune IVF's nprobe")
    p.add_argument("--latency-queries", type=int, default=1000, help="single queries timed for IVF")
    p.add_argument(
        "--slow-latency-queries", type=int, default=40, help="single queries timed for exact search"
    )
    p.add_argument("--batch-queries", type=int, default=256, help="queries in the batched throughput run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nlist", type=int, default=4096, help="IVF cells (4096 ≈ 4·√N at 1M)")
    p.add_argument("--niter", type=int, default=10, help="k-means iterations")
    p.add_argument("--train-per-list", type=int, default=40, help="k-means training vectors per IVF cell")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--index-images", type=int, default=300, help="images for the index build run (0 skips)")
    p.add_argument("--index-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2,000 x 32, 8 images: a check that it runs")
    args = p.parse_args()
    if args.quick:
        quick = dict(n=2000, dim=32, clusters=20, queries=50, tune_queries=30, latency_queries=20,
                     slow_latency_queries=5, batch_queries=16, repeats=2, nlist=16, index_images=8,
                     index_batch_size=4)  # fmt: skip
        vars(args).update(quick)
    print(json.dumps({"faiss": faiss.__version__, "numpy": np.__version__, "threads": faiss.omp_get_max_threads(),
                      "cpus": os.cpu_count()}), flush=True)  # fmt: skip
    start = time.perf_counter()
    rows = bench_search(args)
    if args.index_images:
        bench_index_build(args.index_images, args.index_batch_size, args.seed, args.repeats)
    print(ratio_table(rows))
    print(json.dumps({"total_s": round(time.perf_counter() - start, 1), "loadavg_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
