"""Every benchmark script still runs: each one in its `--quick` mode, as a subprocess with this venv's python.

A benchmark that stops working (an API it calls moved, an argument broke) fails `make test` here instead of on
the day someone re-measures. `--quick` shrinks every size to seconds; its figures mean nothing and are not
checked, only that the script finishes and prints its result. Two scripts run at a time (the machine has 2
cores and most of each run is start-up).

benchmarks/serve_memory_trace.py is not a script of its own: soak_serve.py's quick run starts the server
through it (--trace-memory).
Left out: benchmarks/serve_screenshot.py, which needs `make demo`'s three models and drives chromium for a
docs image (tests/test_serve_browser.py covers the page itself).
benchmarks/gpu_suite.py's quick run (`--cpu-smoke`, alias `--quick`) is tests/test_gpu_suite.py's, which also
checks what it prints; gpu_checks.py, gpu_speed.py and gpu_decode.py are its sections, not scripts.

Scripts whose reference lives in `.bench-env` (open_clip needs torchvision, which cannot sit beside mmlm's
torch) run their mmlm side here and must say so rather than print a ratio.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# script -> (extra arguments, a string its output must contain when it finished)
QUICK_RUNS = {
    "bench_activation.py": ([], '"reference_over_mmlm"'),
    "bench_audio.py": ([], '"mmlm_over_transformers_call"'),
    "bench_clip_data.py": ([], '"uint8_over_float32"'),
    "bench_clip_embed.py": ([], "ratio"),
    "bench_clip_small_data.py": ([], '"summary"'),
    "bench_clip_train.py": ([], '"summary"'),
    "bench_decode.py": (["--threads", "1", "--clock", "cpu"], '"cache": "static"'),
    "bench_guard.py": ([], '"low_contrast"'),
    "bench_index.py": ([], "faiss_ivf"),
    "bench_lora_step.py": ([], '"mmlm_over_peft"'),
    "bench_retrieval_metrics.py": ([], '"same_recall": true'),
    "bench_serve.py": ([], '"run": "overfill"'),
    "bench_video.py": ([], '"long_seeking_speedup"'),
    "bench_vlm_data_memory.py": ([], '"pass": true'),
    "bench_vlm_data_wait.py": ([], '"summary": "median data_wait_fraction after warm-up"'),
    "bench_vlm_decode.py": ([], '"cache": "static"'),
    "bench_vlm_families.py": (["--threads", "1", "--clock", "cpu"], '"family": "chameleon"'),
    "bench_vlm_packing.py": ([], '"packed_over_unpacked"'),
    "clip_demo_ablation.py": ([], '"val_zero_shot_top1"'),
    "fuzz.py": ([], '"target": "server"'),
    "open_clip_parity.py": ([], '"ok": true'),
    # no errors; its latency and memory verdict is for the 10-minute run, not 10 s on a busy machine. Traced:
    # the server starts through serve_memory_trace.py, so a launcher that cannot start it fails here
    "soak_serve.py": (["--trace-memory", "soak_memory.jsonl"], '"errors": 0, "first_errors": []'),
    "train_memory.py": ([], '"mode": "lora8"'),
    "video_demo_ablation.py": ([], '"accuracy_disappear"'),
    "vlm_demo_ablation.py": (["lookup_yesno"], '"vqa_val_accuracy"'),
    "vlm_tower_probe.py": (["--head", "cell", "--colourless", "0.5"], '"heldout_pairs"'),
}


def _run(script: str, out_dir: Path) -> subprocess.CompletedProcess:
    args, _ = QUICK_RUNS[script]
    if script == "vlm_demo_ablation.py":
        args = [*args, "--out", str(out_dir / "ablation")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args],
        cwd=out_dir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Run every benchmark in quick mode, two at a time; return each one's finished process."""
    out_dir = tmp_path_factory.mktemp("benchmarks")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {script: pool.submit(_run, script, out_dir) for script in QUICK_RUNS}
        return {script: future.result() for script, future in futures.items()}


def test_every_benchmark_script_has_a_quick_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {
        "timing.py",
        "serve_screenshot.py",
        "serve_memory_trace.py",
        "vlm_family_builders.py",
        "gpu_suite.py",
        "gpu_checks.py",
        "gpu_speed.py",
        "gpu_decode.py",
    }
    assert scripts == set(QUICK_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(QUICK_RUNS))
def test_benchmark_runs_in_quick_mode(quick_runs, script):
    done = quick_runs[script]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert QUICK_RUNS[script][1] in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_clip_small_data.py", "bench_clip_train.py", "open_clip_parity.py"])
def test_a_missing_reference_is_said_not_faked(quick_runs, script):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        output = quick_runs[script].stdout + quick_runs[script].stderr
        assert "reference: open_clip not installed" in output
        assert '"mmlm/open_clip"' not in output
    else:
        pytest.skip("open_clip is installed here: the scripts compare against it")


def test_decode_benchmarks_give_both_sides_the_same_kind_of_cache():
    import torch
    import transformers

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_decode import TINY_LLAMA, mmlm_cache, transformers_cache_settings
    finally:
        sys.path.remove(str(BENCHMARKS))
    from mmlm.layers.attention import KVCache, StaticKVCache
    from mmlm.layers.fixed_cache import FixedKVCache
    from mmlm.models.decoder_lm import DecoderLM, LMConfig

    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    ours = DecoderLM(LMConfig(vocab_size=64, width=32, layers=1, heads=4, kv_heads=2, mlp_dim=64))
    ids = torch.randint(3, 500, (1, 5))
    expected = {
        "static": (transformers.StaticCache, StaticKVCache),
        "dynamic": (transformers.DynamicCache, KVCache),
        "graph": (transformers.StaticCache, FixedKVCache),  # transformers' closest: its static cache
    }
    for cache, (theirs, our_kind) in expected.items():
        out = reference.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, **transformers_cache_settings(cache))  # fmt: skip
        assert type(out.past_key_values) is theirs
        assert all(type(layer) is our_kind for layer in mmlm_cache(ours, 1, 8, cache))
