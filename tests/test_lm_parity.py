"""mmlm.load on transformers Llama, Mistral and Qwen2 folders: the same logits as transformers, in several
configurations; sharded files, bf16 loading and its memory, the Hugging Face cache, and export back."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import save_file

import mmlm
import mmlm.layers.linear as linear_module
from fixtures_hub import go_offline, serve_hub
from fixtures_lm import one_thread, tiny_lm_config, write_lm_tokenizer, write_tiny_lm  # noqa: F401 (autouse)
from mmlm.inference.causal_lm import CausalLM
from mmlm.layers.attention import project
from mmlm.models.decoder_lm import DecoderLM, LMConfig

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
CASES = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict()),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-rope-llama3": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama-biases-head-dim": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=8)),
    "qwen2-biases": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-sliding-upper-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
}  # fmt: skip


def batch(vocab: int, length: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ids [3, length] and a mask with the second row left-padded by 7 and the third by 30."""
    ids = torch.randint(3, vocab, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :30] = 0
    return ids, mask


def assert_same_logits(ours: CausalLM, ref: transformers.PreTrainedModel, length: int = 40) -> None:
    ids, mask = batch(ref.config.vocab_size, length)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours.model(ids, attention_mask=mask).logits
        # no mask at all: SDPA's causal kernel, a different path in both
        want_full, got_full = ref(ids).logits, ours.model(ids).logits
    real = mask.bool()  # padded positions' outputs are meaningless in both
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(got_full, want_full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    ref = write_tiny_lm(tmp_path, model_type, **overrides)
    m = mmlm.load(tmp_path)
    assert isinstance(m, CausalLM) and m.source_format == model_type
    # mmlm.load puts a CPU model in the decode layout ([in, out] in memory for gate and up): strides only
    assert not m.model.blocks[0].mlp.up.weight.is_contiguous()
    assert_same_logits(m, ref)
    for p in m.model.parameters():  # and the checkpoint's own layout
        p.data = p.data.contiguous()
    assert_same_logits(m, ref)
    names = {name for name, _ in m.model.named_parameters()}
    assert {name for name, _ in m.model.prepare_for_inference().named_parameters()} == names


def test_sliding_window_reaches_back_only_window_positions(tmp_path):
    # The 40-token batch above is 5 windows long; this checks the window actually bites: a change 9+ tokens
    # back must not move the last logits of a 1-layer Mistral with window 8.
    write_tiny_lm(tmp_path, "mistral", sliding_window=8, num_hidden_layers=1)
    m = mmlm.load(tmp_path)
    ids, _ = batch(m.config.vocab_size)
    changed = ids.clone()
    changed[:, -9] = (changed[:, -9] + 1) % m.config.vocab_size
    with torch.no_grad():
        a, b = m.model(ids).logits[:, -1], m.model(changed).logits[:, -1]
        c = m.model(ids[:, -8:]).logits[:, -1]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # rotary angles still differ: positions are absolute


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    ref = write_tiny_lm(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(mmlm.load(tmp_path), ref)


def test_bf16_load_gives_bf16_weights_close_to_fp32(tmp_path):
    ref = write_tiny_lm(tmp_path)
    m = mmlm.load(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    ids, mask = batch(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = m.model(ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    scale = want[real].abs().max()
    assert (got[real].float() - want[real]).abs().max() < 0.05 * scale


PEAK_MEMORY_SCRIPT = """
import sys, threading, time, torch, mmlm
from mmlm.models.decoder_lm import DecoderLM, LMConfig

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

with torch.device("meta"):  # first use of the meta device loads code worth ~70 MiB; keep it out of the figure
    DecoderLM(LMConfig(vocab_size=8, width=8, layers=1, heads=1, kv_heads=1, mlp_dim=8))
base, peak, done = anon_mib(), [0.0], []

def sample():
    while not done:
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.001)

thread = threading.Thread(target=sample)
thread.start()
m = mmlm.load(sys.argv[1], dtype="bfloat16")
done.append(True)
thread.join()
size = sum(p.numel() * p.element_size() for p in m.model.parameters()) / 2**20
print(size, max(peak[0], anon_mib()) - base)
"""


@pytest.mark.slow
def test_bf16_load_of_an_fp32_checkpoint_never_holds_fp32_weights(tmp_path):
    # 12 layers of 512 wide: a 170 MB fp32 file. Loading it in bf16 may take the bf16 size (85 MB) and one
    # tensor in flight, not the fp32 size; the file itself is memory-mapped (page cache, not anonymous memory).
    cfg = tiny_lm_config("llama", vocab_size=4096, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    write_lm_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (4096, 512),
        "lm_head.weight": (4096, 512),
        "model.norm.weight": (512,),
    }
    for i in range(12):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (512, 512), p + "self_attn.k_proj.weight": (256, 512),
                   p + "self_attn.v_proj.weight": (256, 512), p + "self_attn.o_proj.weight": (512, 512),
                   p + "mlp.gate_proj.weight": (1408, 512), p + "mlp.up_proj.weight": (1408, 512),
                   p + "mlp.down_proj.weight": (512, 1408), p + "input_layernorm.weight": (512,),
                   p + "post_attention_layernorm.weight": (512,)}  # fmt: skip
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    fp32_mib = sum(t.numel() * 4 for t in tensors.values()) / 2**20
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK_MEMORY_SCRIPT), str(tmp_path)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    bf16_mib, peak_mib = map(float, out.stdout.split())
    assert bf16_mib == pytest.approx(fp32_mib / 2)
    assert peak_mib < bf16_mib + 0.15 * fp32_mib, (peak_mib, bf16_mib, fp32_mib)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from serve_hub(tmp_path, monkeypatch)


def test_hub_id_loads_through_the_hugging_face_cache(tmp_path, monkeypatch, hub):
    ref = write_tiny_lm(tmp_path / "src")
    hub.push("tiny-org/tiny-llama", tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-llama" is not a folder here
    assert_same_logits(mmlm.load("tiny-org/tiny-llama"), ref)  # downloaded into the cache
    hub.close()
    go_offline(monkeypatch)
    assert isinstance(mmlm.load("tiny-org/tiny-llama"), CausalLM)  # from the cache
    with pytest.raises(mmlm.InputError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        mmlm.load("tiny-org/not-cached")


@pytest.mark.parametrize("case", ["llama-gqa", "llama-tied", "llama-rope-llama3", "mistral-sliding-window",
                                  "qwen2-sliding-upper-layers"])  # fmt: skip
def test_export_round_trips_through_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    ref = write_tiny_lm(tmp_path / "src", model_type, **overrides)
    mmlm.load(tmp_path / "src").save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(ref)
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert_same_logits(mmlm.load(tmp_path / "out"), again)


def test_model_transformers_cannot_hold_round_trips_in_mmlm_format(tmp_path):
    write_lm_tokenizer(tmp_path / "tok")
    # a bias on the output projection only: no transformers Llama-family config says that
    cfg = LMConfig(vocab_size=384, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64, max_positions=64,
                   out_bias=True, sliding_window=6, sliding_layers=[1])  # fmt: skip
    torch.manual_seed(0)
    from mmlm.processing.tokenizer import load_tokenizer

    m = CausalLM(DecoderLM(cfg).eval(), load_tokenizer(tmp_path / "tok"))
    m.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "decoder_lm" and "mmlm_version" in config
    again = mmlm.load(tmp_path / "out")
    ids, mask = batch(384, 20)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids, attention_mask=mask).logits,
                                   m.model(ids, attention_mask=mask).logits, atol=0, rtol=0)  # fmt: skip


def test_unsupported_rope_scaling_is_one_clear_error(tmp_path):
    write_tiny_lm(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mmlm.InputError, match="rope_type 'dynamic' is not supported"):
        mmlm.load(tmp_path)


@pytest.mark.parametrize("pays", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 8, 9])
def test_decode_projection_equals_the_linear_layer(rows, pays, monkeypatch):
    # `project` computes decoding's few rows as (W·xᵀ)ᵀ where that pays; it must be the same function as nn.Linear.
    monkeypatch.setattr(linear_module, "_MEASURED", [pays])
    calls = []
    rows_times_matrix = linear_module.rows_times_matrix
    monkeypatch.setattr(
        linear_module, "rows_times_matrix", lambda *a: calls.append(1) or rows_times_matrix(*a)
    )
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    x = torch.randn(rows, 1, 48)
    torch.testing.assert_close(project(linear, x), linear(x), atol=1e-6, rtol=0)
    assert len(calls) == (pays and rows <= 8)
    linear.weight.data = linear.weight.data.t().contiguous().t()  # decode layout: falls back to the module
    torch.testing.assert_close(project(linear, x), linear(x), atol=1e-6, rtol=0)
    assert len(calls) == (pays and rows <= 8)


def test_the_decode_orientation_is_measured_once_and_used_only_with_a_clear_margin(monkeypatch):
    measure = linear_module.measure_rows_times_matrix
    assert measure(width=64, out=128, repeats=3) > 0  # a ratio of two positive times
    speedups = iter([2.0, 1.1])
    monkeypatch.setattr(linear_module, "measure_rows_times_matrix", lambda: next(speedups))
    monkeypatch.delenv("MMLM_ROWS_TIMES_MATRIX", raising=False)
    monkeypatch.setattr(linear_module, "_MEASURED", [])
    assert linear_module.rows_times_matrix_pays() and linear_module.rows_times_matrix_pays()  # measured once
    monkeypatch.setattr(linear_module, "_MEASURED", [])
    assert not linear_module.rows_times_matrix_pays()  # 1.1× is within the margin: F.linear stays
    for forced, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("MMLM_ROWS_TIMES_MATRIX", forced)
        monkeypatch.setattr(linear_module, "_MEASURED", [])
        assert linear_module.rows_times_matrix_pays() is expected


def test_folder_without_tokenizer_json_is_one_clear_error(tmp_path):
    write_tiny_lm(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(mmlm.InputError, match="no tokenizer.json"):
        mmlm.load(tmp_path)
