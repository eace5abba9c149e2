"""gpu_suite.py's speed sections for CLIP and the server: training, image embedding, `mmlm serve` under load.

Each compares mmlm with its reference in the same run, in interleaved rounds whose order reverses every round
(timing.py), and reports medians with their min-max spread:
- clip_train: bench_clip_train.py's worker processes (one per side, so that peak memory is each side's own)
  train ViT-B/16 at batch 256 under bf16 autocast with fused AdamW: mmlm eager and compiled, open_clip eager
  and compiled; samples/s and the ratio to open_clip compiled. The four share one GPU by taking turns: each
  releases its cached memory after its window and regrows it in an untimed step before the next, and only
  the two compiled ones warm up (compile) at the same time.
- clip_embed: bench_clip_embed.py's random ViT-B/16 CLIPModel, saved and read back with `mmlm.load`, both in
  bf16: images/s at batch 256, the ratio mmlm/transformers, and the peak memory each call adds.
- serve: `mmlm serve` in a subprocess, loaded by bench_serve.py's chat clients: 16 concurrent clients against
  one client at a time, requests/s and p99 latency.
"""

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from bench_clip_embed import reference_clip, write_stand_in_tokenizer
from bench_clip_train import ask
from bench_serve import QUICK_MODEL, free_port, run_load, start_server, summary
from timing import alternating_rounds, interleaved_seconds, rate_spread, ratio_of_medians, spread

import mmlm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_vlm import write_llava_tokenizer  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
# side -> (bench_clip_train worker, compiled)
CLIP_TRAIN_SIDES = {"mmlm_eager": ("mmlm", False), "mmlm_compiled": ("mmlm", True),
                    "open_clip_eager": ("open_clip", False), "open_clip_compiled": ("open_clip", True)}  # fmt: skip


def synchronized(run: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Return `run` followed by a wait for the device, so that wall-clock timing sees the GPU's work."""

    def call() -> object:
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return call


def peak_added_mib(run: Callable[[], object], device: torch.device) -> float | None:
    """Return the most CUDA memory one call of `run` allocates above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def open_clip_missing() -> str | None:
    """Return why open_clip cannot be imported here (not installed, or a dependency missing), or None."""
    try:
        import open_clip  # noqa: F401
    except ImportError as error:
        return (
            "open_clip not installed" if error.name == "open_clip" else f"open_clip not importable: {error}"
        )
    return None


def clip_train(suite) -> None:
    """CLIP training throughput and peak memory of mmlm and open_clip, eager and compiled."""
    smoke = suite.smoke
    model, batch, steps, rounds, warmup = ("tiny", 2, 1, 1, 1) if smoke else ("b16", 256, 20, 3, 3)
    missing = open_clip_missing()
    sides = {name: spec for name, spec in CLIP_TRAIN_SIDES.items() if not missing or spec[0] != "open_clip"}
    dtype = "fp32" if suite.device.type == "cpu" else "bf16-autocast"

    def measure() -> list[dict]:
        # the smoke run traces with dynamo but skips inductor's code generation, minutes on a CPU
        backend = "eager" if smoke else "inductor"
        common = [
            f"--model={model}",
            f"--batch={batch}",
            f"--device={suite.device}",
            f"--compile-backend={backend}",
        ]
        workers = {
            name: subprocess.Popen([sys.executable, str(BENCHMARKS / "bench_clip_train.py"), *common,
                                    *["--compile"] * compiled, "--worker", worker],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for name, (worker, compiled) in sides.items()
        }  # fmt: skip

        def window(proc: subprocess.Popen) -> float:
            """Return samples/s over one timed window; one untimed step first regrows the allocator's cache,
            and the cache is released afterwards for the next worker's turn."""
            ask(proc, "steps 1")
            rate = steps * batch / ask(proc, f"steps {steps}")["seconds"]
            ask(proc, "release")
            return rate

        try:
            for proc in workers.values():
                proc.stdout.readline()  # ready: built and on the device
            compiled = [proc for name, proc in workers.items() if sides[name][1]]
            for (
                proc
            ) in compiled:  # compile at once, on the machine's many cores: at most these train together
                proc.stdin.write(f"steps {warmup}\n")
                proc.stdin.flush()
            for proc in compiled:
                proc.stdout.readline()  # the warm-up's reply
                ask(proc, "release")
            for name, proc in workers.items():  # then the eager ones, in turn
                if not sides[name][1]:
                    ask(proc, f"steps {warmup}")
                    ask(proc, "release")
            rates = alternating_rounds({name: lambda proc=proc: window(proc) for name, proc in workers.items()},
                                       rounds)  # fmt: skip
            memory = {name: ask(proc, "exit") for name, proc in workers.items()}
        finally:
            for proc in workers.values():  # each has replied to `exit` by now, unless something failed
                proc.kill()
                proc.wait(timeout=60)
        lines = []
        for name in CLIP_TRAIN_SIDES:
            if name not in sides:
                lines.append({"name": name, "skipped": missing})
                continue
            peak = memory[name].get("max_allocated_mib", memory[name]["peak_rss_mib"])
            line = {"name": name, "model": model, "batch": batch, "samples_per_s": spread(rates[name], 1),
                    "peak_mib": peak, "peak_kind": "cuda max allocated" if "max_allocated_mib" in memory[name]
                    else "cpu max rss", "rounds": rounds, "steps_per_round": steps}  # fmt: skip
            if "open_clip_compiled" in rates:
                line["ratio_to_open_clip_compiled"] = ratio_of_medians(
                    rates[name], rates["open_clip_compiled"]
                )
            lines.append(line)
        return lines

    suite.part("clip_train", "all", dtype, measure, needs_s=0 if smoke else 200)


def clip_embed(suite) -> None:
    """ViT-B/16 image embedding in bf16: mmlm against transformers, images/s, ratio, peak memory added."""
    smoke = suite.smoke
    arch, batch, rounds = ("tiny", 2, 1) if smoke else ("b16", 256, 5)

    def measure() -> list[dict]:
        reference = reference_clip(arch)
        with tempfile.TemporaryDirectory() as tmp:
            reference.save_pretrained(tmp)
            write_stand_in_tokenizer(Path(tmp))
            ours = mmlm.load(tmp, suite.device, torch.bfloat16).model
        reference = reference.to(suite.device, torch.bfloat16)
        size = reference.config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size).to(suite.device, torch.bfloat16)
        runs = {
            "transformers": synchronized(
                lambda: reference.get_image_features(pixel_values=pixels), suite.device
            ),
            "mmlm": synchronized(lambda: ours.encode_image(pixels), suite.device),
        }
        with torch.inference_mode():
            seconds = interleaved_seconds(runs, rounds, warmup=2)
            memory = {name: peak_added_mib(run, suite.device) for name, run in runs.items()}
        ratio = ratio_of_medians(seconds["transformers"], seconds["mmlm"])
        return [{"name": name, "arch": arch, "batch": batch, "images_per_s": rate_spread(seconds[name], batch),
                 "peak_added_mib": memory[name], "rounds": rounds,
                 **({"ratio_mmlm_over_transformers": ratio} if name == "mmlm" else {})}
                for name in runs]  # fmt: skip

    suite.part("clip_embed", "all", "bf16", measure, needs_s=0 if smoke else 60)


def write_serve_model(folder: Path) -> str:
    """Write the GPU run's served LLaVA folder and return a description of it for the JSON lines.

    transformers builds it on the GPU in bf16 and writes bf16 weights, which `mmlm serve` reads back; the
    tokenizer is the tests' small one, with LLaVA's `<image>` token and chat template.
    """
    image_id = write_llava_tokenizer(folder, model_max_length=4096)
    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14)  # fmt: skip
    text = transformers.LlamaConfig(vocab_size=image_id + 8, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=8, num_attention_heads=32, max_position_embeddings=4096,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            transformers.LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    finally:
        torch.set_default_dtype(default)
    torch.cuda.empty_cache()  # the server, another process, needs the memory
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(folder)
    return (f"LLaVA-1.5-7B's tower (CLIP ViT-L/14-336, 576 image tokens) and LM width (4096) but 8 of its 32 "
            f"layers and a {text.vocab_size}-token vocabulary: a whole 7B folder (13 GB) would take much of the "
            "budget to write and load")  # fmt: skip


def serve(suite) -> None:
    """`mmlm serve`: many concurrent chat clients against one at a time, requests/s and p99 latency."""
    smoke = suite.smoke
    clients, seconds, rounds, max_tokens = (2, 1.0, 1, 4) if smoke else (16, 10.0, 2, 32)
    dtype = "fp32" if smoke else "bf16"

    def measure() -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            if smoke:
                folder, model = str(QUICK_MODEL), "the tests' tiny LLaVA checkpoint"
            else:
                folder, model = tmp, write_serve_model(Path(tmp))
            port = free_port()
            log = Path(tmp) / "serve.log"
            server = start_server(folder, port, ["--device", str(suite.device), "--dtype",
                                                 "float32" if smoke else "bfloat16", "--batch-size",
                                                 str(clients)], log)  # fmt: skip
            try:
                run_load(port, 1, min(seconds, 2.0), max_tokens)  # warm-up: allocator, kernels, first batch
                loads = {f"clients{clients}": clients, "clients1": 1}
                rows = alternating_rounds(
                    {name: lambda n=n: summary(run_load(port, n, seconds, max_tokens), seconds)
                     for name, n in loads.items()}, rounds)  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=60)
        ratio = ratio_of_medians(*([r["requests_per_s"] for r in rows[name]] for name in loads))
        return [{"name": name, "model": model, "clients": loads[name], "seconds": seconds, "rounds": rounds,
                 "max_tokens": max_tokens, "failures": sum(r["failures"] for r in rows[name]),
                 **{key: spread([r[key] for r in rows[name] if r[key] is not None], 2)
                    for key in ("requests_per_s", "p50_ms", "p99_ms", "tokens_per_s")},
                 **({"ratio_concurrent_over_one_at_a_time": ratio} if loads[name] > 1 else {})}
                for name in loads]  # fmt: skip

    suite.part("serve", "all", dtype, measure, needs_s=0 if smoke else 90)
