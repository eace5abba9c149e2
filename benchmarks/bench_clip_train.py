"""CLIP training throughput and peak memory: mmlm against open_clip and transformers' CLIPModel.

The same small CLIP (or ViT-B/16 with `--model b16`) is trained by the three libraries on the same random
pixel/token batches, with the same AdamW settings and the same step: forward, symmetric InfoNCE, backward,
gradient clipping, optimiser step, logit-scale clamp. Each library runs in its own worker process, so the peak
memory of one (max RSS on CPU, `torch.cuda.max_memory_allocated` on GPU) never includes another's. The parent
sends the workers timed windows in turn, reversing the order every window (A, B, C, C, B, A, ...) so that
machine noise lands on all of them, and reports the median (and best and worst) samples/s over the windows, the
peak memory, and the ratios mmlm/open_clip and mmlm/transformers. On CPU it first waits (up to 10 minutes)
for the 1-minute load average to fall below --max-load; a default run then takes 2-3 minutes on two quiet
cores.

Run in the benchmark environment (open_clip needs torchvision, which mmlm does not):
    make bench-env && .bench-env/bin/python benchmarks/bench_clip_train.py
    .bench-env/bin/python benchmarks/bench_clip_train.py --device cuda --model b16 --batch 256 --compile
On CPU training runs in fp32; on CUDA under bf16 autocast, with fused AdamW for every implementation.

    .venv/bin/python benchmarks/bench_clip_train.py --quick   # a toy CLIP, 1 window, no waiting: checks that it runs
--quick runs in mmlm's own environment too: without open_clip it trains mmlm and transformers only, says so,
and reports no mmlm/open_clip ratio.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

IMPLEMENTATIONS = ("mmlm", "open_clip", "transformers")
MODELS = {
    # ~0.9 s per step at batch 64 on two CPU cores: 17 image tokens (4x4 patches + class), 32 text tokens
    "small": dict(image_size=64, patch_size=16, vision_width=256, vision_layers=6, vision_heads=4,
                  text_width=256, text_layers=6, text_heads=4, context_length=32, vocab_size=4096, embed_dim=256),
    # the same with 65 image tokens (8x8 patches + class): ~1.6 s per step
    "small-p8": dict(image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=4,
                     text_width=256, text_layers=6, text_heads=4, context_length=32, vocab_size=4096, embed_dim=256),
    # --quick: a check that the benchmark runs, in seconds
    "tiny": dict(image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_heads=2,
                 text_width=32, text_layers=1, text_heads=2, context_length=8, vocab_size=256, embed_dim=16),
    "b16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                text_width=512, text_layers=12, text_heads=8, context_length=77, vocab_size=49408, embed_dim=512),
}  # fmt: skip
# mmlm's OptimConfig defaults (open_clip's training script uses the same betas and eps for ViTs)
LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 1e-3, 0.1, (0.9, 0.98), 1e-6, 1.0
LOGIT_SCALE_MAX = math.log(100)
BATCHES = 4  # distinct batches, cycled


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_rss_mib() -> float:
    """Return this process's resident anonymous memory in MiB (Linux; 0 elsewhere).

    Unlike max RSS it leaves out the pages of mapped libraries, which the kernel evicts and reloads when other
    jobs need the memory, so it moves less from run to run on a shared machine.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def random_batches(m: dict, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return `count` (pixels [B, 3, H, W], ids [B, L]) pairs, identical in every worker.

    Captions are <bos> tokens <eos> then padding 0. The end token is the largest id and appears once, so
    open_clip's argmax pooling, mmlm's and transformers' first-end-token pooling read the same position.
    """
    g = torch.Generator().manual_seed(0)
    vocab, length = m["vocab_size"], m["context_length"]
    bos, eos = vocab - 2, vocab - 1
    out = []
    for _ in range(count):
        pixels = torch.randn(batch, 3, m["image_size"], m["image_size"], generator=g)
        ids = torch.randint(1, bos, (batch, length), generator=g)
        ends = torch.randint(3, length, (batch, 1), generator=g)  # position of <eos>
        ids[:, 0] = bos
        ids[torch.arange(length) > ends] = 0
        ids.scatter_(1, ends, eos)
        out.append((pixels, ids))
    return out


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """Return AdamW groups as open_clip's training script makes them: no decay on gains, biases, logit scale.

    (open_clip tests `ndim < 2` or a name with bn/ln/bias/logit_scale; in these models that is every tensor below 2-D.)
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": plain, "weight_decay": 0.0}]


def build_mmlm(m: dict, act: str, fused: bool | None = None):
    """Return (model, loss(pixels, ids), optimizer) for mmlm's DualEncoder, clip_loss and param groups."""
    from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
    from mmlm.models.text import TextConfig
    from mmlm.models.vision import VisionConfig
    from mmlm.train.config import OptimConfig
    from mmlm.train.losses import clip_loss
    from mmlm.train.optim import build_optimizer

    vision = VisionConfig(
        image_size=m["image_size"],
        patch_size=m["patch_size"],
        width=m["vision_width"],
        layers=m["vision_layers"],
        heads=m["vision_heads"],
        mlp_dim=4 * m["vision_width"],
        act=act,
        embed_dim=m["embed_dim"],
    )
    text = TextConfig(vocab_size=m["vocab_size"], context_length=m["context_length"], width=m["text_width"],
                      layers=m["text_layers"], heads=m["text_heads"], mlp_dim=4 * m["text_width"], act=act,
                      eos_token_id=m["vocab_size"] - 1, pad_token_id=0, embed_dim=m["embed_dim"])  # fmt: skip
    model = DualEncoder(DualEncoderConfig(vision, text, logit_scale_max=LOGIT_SCALE_MAX))

    def loss(pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image, text = model(pixels, ids)
        return clip_loss(image, text, model.logit_scale)

    optim = OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, grad_clip=GRAD_CLIP)
    return model, loss, build_optimizer(model, optim, fused)


def build_open_clip(m: dict, act: str, fused: bool | None = None):
    """Return (model, loss(pixels, ids), optimizer) for open_clip.CLIP with its ClipLoss."""
    import open_clip

    model = open_clip.CLIP(
        m["embed_dim"],
        vision_cfg=dict(image_size=m["image_size"], patch_size=m["patch_size"], width=m["vision_width"],
                        layers=m["vision_layers"], head_width=m["vision_width"] // m["vision_heads"]),
        text_cfg=dict(vocab_size=m["vocab_size"], context_length=m["context_length"], width=m["text_width"],
                      layers=m["text_layers"], heads=m["text_heads"]),
        quick_gelu=act == "quick_gelu",
    )  # fmt: skip
    criterion = open_clip.ClipLoss()

    def loss(pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        image, text, scale = model(pixels, ids)  # normalised features, exp(logit_scale)
        return criterion(image, text, scale)

    return model, loss, torch.optim.AdamW(decay_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=fused)


def build_transformers(m: dict, act: str, fused: bool | None = None):
    """Return (model, loss(pixels, ids), optimizer) for transformers' CLIPModel with return_loss=True."""
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=m["vocab_size"], hidden_size=m["text_width"], intermediate_size=4 * m["text_width"],
                         num_hidden_layers=m["text_layers"], num_attention_heads=m["text_heads"],
                         max_position_embeddings=m["context_length"], hidden_act=act,
                         bos_token_id=m["vocab_size"] - 2, eos_token_id=m["vocab_size"] - 1, pad_token_id=0),
        vision_config=dict(hidden_size=m["vision_width"], intermediate_size=4 * m["vision_width"],
                           num_hidden_layers=m["vision_layers"], num_attention_heads=m["vision_heads"],
                           image_size=m["image_size"], patch_size=m["patch_size"], hidden_act=act),
        projection_dim=m["embed_dim"],
    )  # fmt: skip
    model = transformers.CLIPModel(cfg)

    def loss(pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, pixel_values=pixels, return_loss=True).loss

    return model, loss, torch.optim.AdamW(decay_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=fused)


BUILDERS = {"mmlm": build_mmlm, "open_clip": build_open_clip, "transformers": build_transformers}


def worker(args: argparse.Namespace) -> None:
    """Train one implementation on request: read `steps N` / `release` / `exit` lines on stdin, answer one JSON
    line each. `release` hands the CUDA allocator's cached blocks back, so that workers that take turns on one
    GPU each hold their peak memory only while they train (gpu_suite.py runs four)."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the replies
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    # fused AdamW on CUDA for all three (one kernel launch for every parameter), PyTorch's default elsewhere
    model, loss_fn, opt = BUILDERS[args.worker](MODELS[args.model], args.act, True if cuda else None)
    rss_built = peak_rss_mib()
    model.to(device).train()
    compiled = args.compile and args.worker != "transformers"
    if compiled:
        loss_fn = torch.compile(loss_fn, backend=args.compile_backend)
    batches = [
        (p.to(device), i.to(device)) for p, i in random_batches(MODELS[args.model], args.batch, BATCHES)
    ]
    done, peak_anon = 0, anon_rss_mib()
    reply.write(json.dumps({"ready": args.worker, "rss_built_mib": round(rss_built, 1)}) + "\n")
    for line in sys.stdin:
        command = line.split()
        if command[0] == "exit":
            break
        if command[0] == "release":
            if cuda:
                torch.cuda.empty_cache()
            reply.write(json.dumps({"released": cuda}) + "\n")
            continue
        steps = int(command[1])
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            pixels, ids = batches[done % BATCHES]
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                loss = loss_fn(pixels, ids)
            peak_anon = max(peak_anon, anon_rss_mib())  # all activations are alive here
            loss.backward()
            peak_anon = max(peak_anon, anon_rss_mib())  # all gradients are alive here
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            done += 1
        value = loss.item()  # also waits for the GPU
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        reply.write(json.dumps({"seconds": wall, "cpu_seconds": cpu, "loss": value}) + "\n")
    memory = {"peak_rss_mib": round(peak_rss_mib(), 1), "rss_built_mib": round(rss_built, 1),
              "peak_anon_rss_mib": round(peak_anon, 1)}  # fmt: skip
    if cuda:
        memory["max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    memory["compiled"] = compiled
    reply.write(json.dumps(memory) + "\n")


def wait_for_quiet_machine(threshold: float, max_wait_s: float) -> float:
    """Poll the 1-minute load average every 15 s until it is at most `threshold` (or give up); return it."""
    deadline = time.monotonic() + max_wait_s
    while (load := os.getloadavg()[0]) > threshold and time.monotonic() < deadline:
        print(f"load {load:.2f} > {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(15)
    return load


def ask(proc: subprocess.Popen, command: str) -> dict:
    """Send one command line to a worker and return its JSON reply."""
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {proc.args[-1]} exited with {proc.wait()}")
    return json.loads(line)


def available_implementations() -> tuple[str, ...]:
    """Return the implementations this environment can run; without open_clip, say that its ratio is missing."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("reference: open_clip not installed; mmlm and transformers sides only, no ratio against open_clip",
              file=sys.stderr, flush=True)  # fmt: skip
        return tuple(name for name in IMPLEMENTATIONS if name != "open_clip")
    return IMPLEMENTATIONS


def main() -> None:
    """Run the workers in turn and print one JSON line per window, per worker's memory, then the summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--act", choices=("quick_gelu", "gelu"), default="quick_gelu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed window")
    parser.add_argument("--repeats", type=int, default=8, help="timed windows per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile mmlm's and open_clip's step")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend (gpu_suite.py's CPU smoke run traces with 'eager')",
    )
    parser.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-minute load is below")
    parser.add_argument("--quick", action="store_true", help="a toy CLIP, 1 window, no waiting for the load")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.model, args.batch, args.steps, args.repeats, args.warmup = "tiny", 4, 1, 1, 1
        args.max_load = math.inf
    implementations = available_implementations()

    forwarded = [
        f"--model={args.model}",
        f"--act={args.act}",
        f"--batch={args.batch}",
        f"--device={args.device}",
    ]
    forwarded += [f"--compile-backend={args.compile_backend}"] + ["--compile"] * args.compile
    load = wait_for_quiet_machine(args.max_load, 600) if args.device == "cpu" else os.getloadavg()[0]
    header = {"model": args.model, **MODELS[args.model], "act": args.act, "batch": args.batch,
              "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "compile": args.compile, "load_1min_at_start": round(load, 2)}  # fmt: skip
    if args.device.startswith("cuda"):
        header["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(json.dumps(header), flush=True)
    workers = {
        name: subprocess.Popen([sys.executable, __file__, *forwarded, "--worker", name],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name in implementations
    }  # fmt: skip
    for proc in workers.values():
        proc.stdout.readline()  # ready
        ask(proc, f"steps {args.warmup}")
    rates = {name: [] for name in implementations}
    for window in range(args.repeats):
        order = list(workers.items())
        for name, proc in order if window % 2 == 0 else order[::-1]:  # reversed every other window
            load = os.getloadavg()[0]
            r = ask(proc, f"steps {args.steps}")
            rates[name].append(args.steps * args.batch / r["seconds"])
            print(json.dumps({"impl": name, "window": window, "samples_per_s": round(rates[name][-1], 2),
                              "seconds": round(r["seconds"], 3), "cpu_util": round(r["cpu_seconds"] / r["seconds"], 2),
                              "loss": round(r["loss"], 4), "load_1min": round(load, 2)}), flush=True)  # fmt: skip
    memory = {}
    for name, proc in workers.items():
        memory[name] = ask(proc, "exit")
        proc.wait()
        print(json.dumps({"impl": name, **memory[name]}), flush=True)

    figures = {
        "median_samples_per_s": {name: statistics.median(rates[name]) for name in implementations},
        "best_samples_per_s": {name: max(rates[name]) for name in implementations},
        "worst_samples_per_s": {name: min(rates[name]) for name in implementations},
    }
    for key in (
        ("max_allocated_mib",) if args.device.startswith("cuda") else ("peak_rss_mib", "peak_anon_rss_mib")
    ):
        figures[key] = {name: memory[name][key] for name in implementations}
    summary = {}
    for key, values in figures.items():
        summary[key] = {name: round(v, 2) for name, v in values.items()}
        summary[key + "_ratio"] = {
            f"mmlm/{other}": round(values["mmlm"] / values[other], 3) for other in implementations[1:]
        }
    summary["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
