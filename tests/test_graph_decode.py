"""Fixed-shape decoding (cache="graph"): the same tokens and texts as the static and dynamic caches, logits equal
to the eager step's at every step, host reads only every `sync_every` steps, and one-line errors for what it
cannot run. The CUDA-graph capture itself is checked by the `cuda`-marked test on a GPU machine."""

import dataclasses
import math

import pytest
import torch
from fixtures_gemma3 import write_tiny_gemma3
from PIL import Image

import mmlm
import mmlm.inference.graph_decode as graph_decode
from fixtures_lm import one_thread, write_tiny_lm  # noqa: F401 (autouse)
from fixtures_vlm import write_tiny_llava
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.inference.base import check_request
from mmlm.inference.generation import GenerationSettings, generate_ids, lm_step
from mmlm.inference.graph_decode import generate_fixed_ids
from mmlm.inference.graph_step import GraphPool, GraphStep
from mmlm.layers.attention import KVCache
from mmlm.models.decoder_lm import DecoderLM, LMConfig
from mmlm.models.vlm import VisionLanguageModel

PROMPTS = ["a cat sitting on", "the red car parked near the river at night,", "zebras"]  # 3 lengths: padding
CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "mistral-window": ("mistral", dict(sliding_window=8)),  # 30 new tokens run well past the window
    "qwen2-tied-bias": ("qwen2", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request, tmp_path_factory):
    model_type, overrides = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    write_tiny_lm(folder, model_type, **overrides)
    return mmlm.load(folder)


def eager_ids(m, prompts, settings, eos, cache="dynamic", drop_finished=True) -> list[list[int]]:
    ids, mask = m.encode(prompts)
    kv = m.model.new_cache(
        len(prompts), ids.shape[1] + settings.max_new_tokens if cache == "static" else None
    )
    out = [[] for _ in prompts]
    for step in generate_ids(lm_step(m.model), kv, settings, eos, ids, attention_mask=mask,
                             drop_finished=drop_finished):  # fmt: skip
        for row, token in step:
            out[row].append(token)
    return out


def graph_ids(m, prompts, settings, eos, sync_every=4) -> list[list[int]]:
    ids, mask = m.encode(prompts)
    cache = m.model.new_fixed_cache(len(prompts), ids.shape[1] + settings.max_new_tokens)
    return generate_fixed_ids(lm_step(m.model), cache, settings, eos, ids, attention_mask=mask,
                              sync_every=sync_every)  # fmt: skip


def early_end_token(m, prompts, n) -> tuple[list[list[int]], int]:
    """Return the rows' greedy ids without end tokens, and a token that ends row 1 early but not row 0."""
    free = eager_ids(m, prompts, GenerationSettings(n), [])
    token = next(t for t in free[1][3:] if t not in free[0])
    return free, token


def test_greedy_graph_ids_equal_static_and_dynamic(lm):
    settings = GenerationSettings(max_new_tokens=30)
    free, token = early_end_token(lm, PROMPTS, 30)
    eos = [2, token]
    want = eager_ids(lm, PROMPTS, settings, eos, "dynamic")
    assert eager_ids(lm, PROMPTS, settings, eos, "static") == want
    assert graph_ids(lm, PROMPTS, settings, eos) == want
    ends = [min([row.index(t) for t in eos if t in row], default=len(row)) for row in free]
    assert want == [row[:end] for row, end in zip(free, ends, strict=True)]
    assert ends[1] < 30 and len(set(ends)) > 1  # row 1 ended early, and not with every other row


def test_graph_texts_with_end_tokens_and_stop_strings_equal_static(lm, monkeypatch):
    _, token = early_end_token(lm, PROMPTS, 30)
    monkeypatch.setattr(lm, "eos_token_ids", [2, token])
    full = lm.generate(PROMPTS, 30, cache="static")
    assert lm.generate(PROMPTS, 30, cache="graph") == full
    stop = full[0][6:9]  # three characters from the middle of row 0's output
    cut = lm.generate(PROMPTS, 30, stop=[stop], cache="static")
    assert cut[0] == full[0][: full[0].find(stop)]
    assert lm.generate(PROMPTS, 30, stop=[stop], cache="graph") == cut
    assert "".join(lm.stream(PROMPTS[0], 30, stop=[stop], cache="graph")) == cut[0]
    assert "".join(lm.stream(PROMPTS[2], 30, cache="graph")) == full[2]


def test_sampled_graph_ids_equal_the_fixed_shape_eager_loop(lm):
    """The eager loop drops finished rows, so its sampler draws for fewer rows from then on; with fixed shapes
    (drop_finished=False, as the graph loop) both draw for every row at every step, so the tokens agree."""
    _, token = early_end_token(lm, PROMPTS, 20)
    settings = GenerationSettings(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=5)
    want = eager_ids(lm, PROMPTS, settings, [2, token], drop_finished=False)
    assert graph_ids(lm, PROMPTS, settings, [2, token]) == want
    assert want != eager_ids(
        lm, PROMPTS, dataclasses.replace(settings, seed=6), [2, token], drop_finished=False
    )
    one = lm.generate(PROMPTS[1], 20, temperature=1.0, seed=3, cache="static")
    assert lm.generate(PROMPTS[1], 20, temperature=1.0, seed=3, cache="graph") == one


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    write_tiny_llava(folder)
    return mmlm.load(folder)


def photo(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def test_graph_generation_of_a_llava_batch_with_images_equals_dynamic(llava):
    prompts = [
        "USER: <image>\nWhat is it? ASSISTANT:",
        "USER: <image>\nDescribe the picture in words. ASSISTANT:",
    ]
    images = [[photo(0)], [photo(1)]]
    want = llava.generate(prompts, images, max_new_tokens=12, cache="dynamic")
    assert llava.generate(prompts, images, max_new_tokens=12, cache="graph") == want
    assert want != llava.generate(prompts, [[photo(2)], [photo(3)]], max_new_tokens=12, cache="dynamic")


def test_fixed_step_logits_equal_the_eager_dynamic_step(lm):
    ids, mask = lm.encode(PROMPTS)
    batch, length = ids.shape
    runner = GraphStep(lm_step(lm.model), lm.model.new_fixed_cache(batch, length + 10), capture=False)
    step, kv = lm_step(lm.model), [KVCache() for _ in lm.model.blocks]
    with torch.inference_mode():
        fixed, eager = runner.prefill(ids, None, mask), step(ids, None, mask, kv)
        for _ in range(10):
            torch.testing.assert_close(fixed, eager, rtol=0, atol=1e-5)
            tokens = eager.argmax(-1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            fixed, eager = runner(tokens), step(tokens[:, None], None, mask, kv)
        torch.testing.assert_close(fixed, eager, rtol=0, atol=1e-5)
    assert runner.written == length + 10


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("max_new_tokens, sync_every", [(40, 8), (30, 16), (12, 1)])
def test_the_loop_reads_the_device_only_every_sync_every_steps(monkeypatch, max_new_tokens, sync_every):
    torch.manual_seed(0)
    model = DecoderLM(LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64,
                               max_positions=128, initializer_range=0.2)).eval()  # fmt: skip
    ids = torch.randint(3, 64, (2, 5))
    reads, other = [], []
    read_back = graph_decode.read_back
    monkeypatch.setattr(graph_decode, "read_back", lambda t: reads.append(read_back(t)) or reads[-1])
    for name in HOST_READS:  # any other host read of a tensor while the loop runs is a hidden sync
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _f=original, _n=name: other.append(_n) or _f(self, *a)
        )
    reads.clear()
    settings = GenerationSettings(max_new_tokens)
    cache = model.new_fixed_cache(2, 5 + max_new_tokens)
    tokens = generate_fixed_ids(lm_step(model), cache, settings, [], ids, sync_every=sync_every)
    monkeypatch.undo()
    assert [len(t) for t in tokens] == [max_new_tokens] * 2  # no end token: every step ran
    assert len(reads) <= math.ceil(max_new_tokens / sync_every) + 1
    assert other == [read for read in other if read == "tolist"] and len(other) == len(reads)


def test_the_loop_stops_at_the_first_check_after_every_row_ended():
    torch.manual_seed(0)
    model = DecoderLM(LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64,
                               max_positions=128, initializer_range=0.2)).eval()  # fmt: skip
    ids = torch.randint(3, 64, (2, 5))
    runner = GraphStep(lm_step(model), model.new_fixed_cache(2, 45))
    rows = graph_decode.new_rows(GenerationSettings(40), [], 2, ids.device)
    free = graph_decode.decode_on_device(runner, rows, GenerationSettings(40), [], ids, sync_every=40)
    eos = sorted({free[0][6], free[1][6]})  # both rows have ended by step 7
    runner = GraphStep(lm_step(model), model.new_fixed_cache(2, 45))
    picked = graph_decode.decode_on_device(runner, rows, GenerationSettings(40), eos, ids, sync_every=8)
    assert [len(row) for row in picked] == [8, 8] and runner.written == 5 + 7
    assert picked == [row[:8] for row in free]


def test_too_small_a_cache_and_too_many_steps_raise_input_error():
    torch.manual_seed(0)
    model = DecoderLM(LMConfig(vocab_size=64, width=32, layers=1, heads=2, kv_heads=1, mlp_dim=64)).eval()
    ids = torch.randint(3, 64, (1, 6))
    with pytest.raises(InputError, match=r"^max_new_tokens: the fixed-shape cache holds 10 slots, but a 6-slot "
                                         r"prompt and 8 new tokens need 13$"):  # fmt: skip
        generate_fixed_ids(lm_step(model), model.new_fixed_cache(1, 10), GenerationSettings(8), [], ids)
    runner = GraphStep(lm_step(model), model.new_fixed_cache(1, 7))
    with torch.inference_mode():
        runner(runner.prefill(ids).argmax(-1))
        with pytest.raises(
            InputError, match=r"^max_length: the fixed-shape cache holds 7 slots; 7 are written"
        ):
            runner(torch.zeros(1, dtype=torch.long))
    with pytest.raises(InputError, match="sync_every: expected a positive integer"):
        generate_fixed_ids(lm_step(model), model.new_fixed_cache(1, 20), GenerationSettings(8), [], ids,
                           sync_every=0)  # fmt: skip


def test_families_and_styles_without_graph_decoding_are_refused(llava, monkeypatch, tmp_path):
    refused = (
        r"^cache: 'graph' decodes CausalLM and LLaVA-style VLMs; this model takes 'static' or 'dynamic'$"
    )
    write_tiny_gemma3(tmp_path)  # Gemma 3's images attend both ways: its own wrapper, static or dynamic only
    gemma3 = mmlm.load(tmp_path)
    with pytest.raises(InputError, match=refused):
        gemma3.generate("hello", max_new_tokens=4, cache="graph")
    assert isinstance(gemma3.generate("hello", max_new_tokens=4, cache="dynamic"), str)
    with pytest.raises(InputError, match=refused):
        check_request(GenerationSettings(), "graph")  # what the Qwen2-VL and Chameleon wrappers call too
    with pytest.raises(InputError, match=r"^cache: expected 'static', 'dynamic' or 'graph', got 'paged'$"):
        check_request(GenerationSettings(), "paged", graph=True)
    mrope = DecoderLM(LMConfig(vocab_size=64, width=32, layers=1, heads=2, kv_heads=1, mlp_dim=64,
                               mrope_section=[2, 3, 3]))  # fmt: skip
    with pytest.raises(InputError, match="not M-RoPE's three"):
        mrope.new_fixed_cache(1, 8)
    model = DecoderLM(LMConfig(vocab_size=64, width=32, layers=1, heads=2, kv_heads=1, mlp_dim=64))
    with pytest.raises(InputError, match="a fixed-shape cache sets positions and masks"):
        model(
            torch.ones(1, 3, dtype=torch.long),
            position_ids=torch.arange(3)[None],
            cache=model.new_fixed_cache(1, 8),
        )
    flamingo = dataclasses.replace(llava.config, connector=ConnectorConfig(
        kind="cross_attention", num_queries=4, depth=1, heads=2, cross_attn_every_n_layers=1))  # fmt: skip
    monkeypatch.setattr(llava, "model", VisionLanguageModel(flamingo).eval())
    with pytest.raises(InputError, match=r"^cache: 'graph' decodes fusion styles that keep no cache of their "
                                         r"own; cross_attention keeps one, use 'static' or 'dynamic'$"):  # fmt: skip
        llava.generate("USER: hello ASSISTANT:", max_new_tokens=4, cache="graph")
    assert isinstance(llava.generate("USER: hello ASSISTANT:", max_new_tokens=4, cache="dynamic"), str)


@pytest.mark.cuda
def test_captured_cuda_graph_replays_the_eager_fixed_step():
    torch.manual_seed(0)
    model = DecoderLM(LMConfig(vocab_size=256, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128,
                               sliding_window=6, sliding_layers=[1], initializer_range=0.2)).cuda().eval()  # fmt: skip
    ids = torch.randint(3, 256, (3, 7), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    graphed = GraphStep(lm_step(model), model.new_fixed_cache(3, 20))
    eager = GraphStep(lm_step(model), model.new_fixed_cache(3, 20), capture=False)
    with torch.inference_mode():
        a, b = graphed.prefill(ids, None, mask), eager.prefill(ids, None, mask)
        first = None
        for i in range(12):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
            tokens = b.argmax(-1)
            if i:  # the first call captures the graph, which synchronises; a replay must not
                torch.cuda.set_sync_debug_mode("error")
            try:
                a = graphed(tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            b = eager(tokens)
            if i == 0:
                first, first_eager = a, b.clone()
        torch.testing.assert_close(first, first_eager, rtol=0, atol=1e-4)  # not overwritten by later replays
    assert graphed.graph is not None and eager.graph is None
    sampled = GenerationSettings(temperature=1.0, top_k=10, top_p=0.9, seed=0)
    rows, eos = graph_decode.new_rows(sampled, [5], 3, ids.device), torch.tensor([5], device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # the loop's token pick and end test stay on the device
    try:
        tokens = graph_decode.pick_tokens(rows, a)
        (tokens[:, None] == eos).any(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cache = model.new_fixed_cache(3, 7 + 16)
    settings = GenerationSettings(16)
    got = generate_fixed_ids(lm_step(model), cache, settings, [5], ids, attention_mask=mask)
    kv = model.new_cache(3)
    want = [[] for _ in range(3)]
    for step in generate_ids(lm_step(model), kv, settings, [5], ids, attention_mask=mask):
        for row, token in step:
            want[row].append(token)
    assert got == want


class ReplayedGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU: `replay` reruns the captured step into its static output."""

    def __init__(self, run, output):
        self.run, self.output = run, output

    def replay(self):
        self.output.copy_(self.run())


def fake_capture(captures):
    """A capture_cuda_graph for CPU tests: records the capture, leaves the cache state as a capture would."""

    def capture(run, state):
        saved = [t.clone() for t in state]
        output = run()  # a real capture records the kernels without running them: put the state back
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
        captures.append(output)
        return ReplayedGraph(run, output), output

    return capture


def test_graph_pool_reuses_a_reset_cache_and_its_graph_across_calls(lm, monkeypatch):
    """Calls with the same batch size and bucketed length get the same cache back, emptied: a second prompt
    shorter than the first must not see the first's keys; the graph is captured once for both."""
    captures = []
    monkeypatch.setattr("mmlm.inference.graph_step.capture_cuda_graph", fake_capture(captures))
    monkeypatch.setattr(
        "mmlm.inference.graph_step.GraphStep.__init__.__defaults__", (True,)
    )  # capture on CPU
    pool = GraphPool(lm.model.new_fixed_cache, bucket=64, capacity=2)
    settings = GenerationSettings(12)
    outputs = []
    for prompts in (PROMPTS[1:2], PROMPTS[0:1], PROMPTS[1:2]):
        ids, mask = lm.encode(prompts)
        cache = pool.cache(1, ids.shape[1] + settings.max_new_tokens)
        outputs.append((cache, generate_fixed_ids(lm_step(lm.model), cache, settings, [], ids)))
        assert outputs[-1][1] == eager_ids(lm, prompts, settings, [], "static")
    assert outputs[0][0] is outputs[1][0] is outputs[2][0] and cache.max_length == 64
    assert len(captures) == 1 and outputs[0][1] == outputs[2][1] != outputs[1][1]


def test_graph_pool_buckets_lengths_and_drops_the_least_recently_used():
    made = []
    pool = GraphPool(lambda batch, length: made.append((batch, length)) or DecoderLM(
        LMConfig(vocab_size=64, width=32, layers=1, heads=2, kv_heads=1, mlp_dim=64)).new_fixed_cache(batch, length),
        bucket=256, capacity=2)  # fmt: skip
    a = pool.cache(1, 10)
    assert pool.cache(1, 256) is a and a.max_length == 256  # 10 and 256 slots: one bucket
    b = pool.cache(1, 257)
    assert b.max_length == 512 and pool.cache(4, 10) is not a  # a third shape: `a`, the oldest, goes
    assert list(pool.caches) == [(1, 512), (4, 256)] and made == [(1, 256), (1, 512), (4, 256)]
    assert pool.cache(1, 300) is b
    with pytest.raises(ValueError, match="bucket and capacity must be positive"):
        GraphPool(lambda batch, length: None, bucket=0)


def test_loaded_models_keep_their_graph_caches_between_generate_calls(lm):
    first = lm.generate(PROMPTS, 8, cache="graph")
    key = (len(PROMPTS), 256)  # three prompts, prompt + 8 new tokens in the first 256-slot bucket
    held = lm._graph_pool.caches[key]
    assert lm.generate(PROMPTS, 8, cache="graph") == first == lm.generate(PROMPTS, 8, cache="static")
    assert lm._graph_pool.caches[key] is held
