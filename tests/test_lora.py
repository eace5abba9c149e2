"""LoRA: identity at init, only A and B train, merging, fused-qkv slices against split q/k/v projections,
and PEFT adapter folders (round trip, config, transformers Llama module names)."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmlm.checkpoints.peft import llama_module_names, load_adapter, save_adapter
from mmlm.errors import InputError
from mmlm.layers import Block
from mmlm.layers.lora import LoRALinear, apply_lora, merge_lora

DIM, HEADS, KV_HEADS, MLP_DIM, VOCAB = 16, 4, 2, 24, 11
HEAD_DIM = DIM // HEADS


class TinyLM(nn.Module):
    """Two Llama-style blocks (GQA, SwiGLU) and a head, named like DecoderLM."""

    def __init__(self) -> None:
        super().__init__()
        block = dict(act="silu", norm="rms", bias=False, kv_heads=KV_HEADS, gated_mlp=True)
        self.blocks = nn.ModuleList(Block(DIM, HEADS, MLP_DIM, **block) for _ in range(2))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.lm_head(x)


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    # B starts at zero; give it values so the update is visible
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(7))


def test_fresh_lora_is_the_base_model_and_keeps_its_parameter_names():
    model = tiny_lm()
    x = inputs()
    before, base_keys = model(x), set(model.state_dict())
    weight = model.blocks[0].attn.qkv.weight
    wrapped = apply_lora(model, rank=4, alpha=8, targets=["q", "v", "out", "gate", "up", "down"])
    assert wrapped == [
        f"blocks.{i}.{n}"
        for i in range(2)
        for n in ("attn.qkv", "attn.out", "mlp.gate", "mlp.up", "mlp.down")
    ]
    assert torch.equal(model(x), before)
    assert model.blocks[0].attn.qkv.weight is weight  # the same Parameter, so key maps keep working
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"{n}.lora_{ab}" for n in wrapped for ab in "AB"}
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == {"q": (0, 16), "v": (24, 32)}
    assert qkv.lora_A.shape == (8, DIM) and qkv.lora_B.shape == (16 + 8, 4)
    # PEFT's init: A ~ U(±1/√in), B = 0
    assert qkv.lora_A.abs().max() <= 1 / math.sqrt(DIM) and not qkv.lora_B.any()


def test_only_lora_parameters_train_and_frozen_ones_stay_bitwise_equal():
    model = tiny_lm()
    apply_lora(model, rank=2, alpha=4, targets=["qkv", "down"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.qkv", "mlp.down") for ab in "AB"
    }
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # every parameter in the optimizer, with weight decay: frozen ones get no gradient, so no step at all
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # step 1 moves B only (A's gradient is Bᵀ·… = 0); step 2 moves A too
        opt.zero_grad()
        model(inputs()).square().mean().backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in lora.items())


@pytest.mark.parametrize(
    "targets", [["q", "k", "v", "out", "down", "lm_head"], ["qkv", "gate"], r".*\.attn\.(k|v)"]
)
def test_merged_model_equals_unmerged(targets):
    model = tiny_lm()
    apply_lora(model, rank=3, alpha=5, targets=targets, rslora=True)
    randomize_lora(model)
    x = inputs()
    unmerged = model(x)
    merged = merge_lora(model)
    assert merged and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in merged)
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_fused_qkv_slices_equal_peft_lora_on_separate_q_k_v_projections():
    torch.manual_seed(0)
    fused = nn.Linear(DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=True)
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    slices = {"q": (0, q_rows), "v": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
    lora = LoRALinear(fused, rank=2, alpha=6, slices=slices)
    with torch.no_grad():
        lora.lora_B.normal_()
    (_, a_q, b_q), (_, a_v, b_v) = lora.pairs()
    # the split model by hand: q_proj, k_proj, v_proj hold the fused rows; PEFT adds s·B(A x) to q and v only
    w_q, w_k, w_v = fused.weight.split([q_rows, kv_rows, kv_rows])
    c_q, c_k, c_v = fused.bias.split([q_rows, kv_rows, kv_rows])
    x, s = inputs(), 6 / 2
    q = x @ w_q.T + c_q + s * (x @ a_q.T) @ b_q.T
    k = x @ w_k.T + c_k
    v = x @ w_v.T + c_v + s * (x @ a_v.T) @ b_v.T
    torch.testing.assert_close(lora(x), torch.cat([q, k, v], -1))
    expected_delta = torch.cat([s * b_q @ a_q, torch.zeros(kv_rows, DIM), s * b_v @ a_v])
    torch.testing.assert_close(lora.delta_weight(), expected_delta)


def test_rslora_scales_by_alpha_over_root_rank():
    linear = nn.Linear(4, 3)
    assert LoRALinear(linear, rank=16, alpha=8).scale == 0.5
    assert LoRALinear(linear, rank=16, alpha=8, rslora=True).scale == 2.0


def test_regex_and_names_choose_the_same_slices():
    by_names, by_regex = tiny_lm(), tiny_lm()
    assert apply_lora(by_names, 2, 4, ["q", "v"]) == apply_lora(by_regex, 2, 4, r"blocks\.\d+\.attn\.(q|v)")
    assert (
        by_regex.blocks[1].attn.qkv.slices
        == by_names.blocks[1].attn.qkv.slices
        == {"q": (0, 16), "v": (24, 32)}
    )


def test_adapter_round_trip_into_a_fresh_base_model(tmp_path):
    model = tiny_lm()
    base = copy.deepcopy(model)
    apply_lora(model, rank=4, alpha=8, targets=["q", "v", "out", "gate", "up", "down"], dropout=0.05)
    randomize_lora(model)
    names = llama_module_names()
    adapted = save_adapter(model, tmp_path, names, base_model_name_or_path="tiny-llama")
    assert "model.layers.1.self_attn.v_proj" in adapted and len(adapted) == 2 * 6
    wrapped = load_adapter(base, tmp_path, names)
    assert wrapped == [
        f"blocks.{i}.{n}"
        for i in range(2)
        for n in ("attn.qkv", "attn.out", "mlp.gate", "mlp.up", "mlp.down")
    ]
    model.eval(), base.eval()
    x = inputs()
    assert torch.equal(base(x), model(x))
    assert base.blocks[0].attn.qkv.slices == {"q": (0, 16), "v": (24, 32)}
    assert base.blocks[0].attn.qkv.dropout == 0.05
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_adapter_files_use_peft_names_shapes_and_config(tmp_path):
    model = tiny_lm()
    apply_lora(model, rank=4, alpha=16, targets=["q", "v"], rslora=True)
    save_adapter(model, tmp_path, llama_module_names())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.0, bias="none"
    )
    assert {k: config[k] for k in expected} == expected
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["use_rslora"] is True
    assert config["base_model_name_or_path"] is None
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers"
    assert {k: list(v.shape) for k, v in tensors.items() if k.startswith(f"{prefix}.0.")} == {
        f"{prefix}.0.self_attn.q_proj.lora_A.weight": [4, DIM],
        f"{prefix}.0.self_attn.q_proj.lora_B.weight": [HEADS * HEAD_DIM, 4],
        f"{prefix}.0.self_attn.v_proj.lora_A.weight": [4, DIM],
        f"{prefix}.0.self_attn.v_proj.lora_B.weight": [KV_HEADS * HEAD_DIM, 4],
    }
    assert len(tensors) == 8


def test_partial_adapters_list_full_module_names(tmp_path):
    # short names would make PEFT adapt q_proj of every layer, so a layer-0-only LoRA names its modules
    model = tiny_lm()
    apply_lora(model, rank=2, alpha=2, targets=r"blocks\.0\.attn\.q")
    save_adapter(model, tmp_path, llama_module_names())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_llama_names_with_a_vlm_prefix():
    old_llava = llama_module_names("lm.", "language_model.model.", head="language_model.lm_head")
    assert old_llava("lm.blocks.3.attn.v") == "language_model.model.layers.3.self_attn.v_proj"
    assert old_llava("lm.lm_head") == "language_model.lm_head"
    new_llava = llama_module_names("lm.", "model.language_model.")
    assert new_llava("lm.blocks.0.mlp.down") == "model.language_model.layers.0.mlp.down_proj"
    assert new_llava("lm.blocks.0.attn.qkv") is None and new_llava("vision.blocks.0.attn.q") is None


def test_peft_adapter_on_transformers_llama_equals_hand_merged_weights(tmp_path):
    """A PEFT-format adapter written by hand with transformers' names, loaded into DecoderLM, against the
    transformers model with W += (alpha/r)·B·A folded into its q_proj, v_proj and down_proj by hand."""
    transformers = pytest.importorskip("transformers")
    from mmlm.checkpoints.hf_llama import llama_key_map, lm_config_from_hf
    from mmlm.checkpoints.keymap import to_ours
    from mmlm.models.decoder_lm import DecoderLM

    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=MLP_DIM, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    cfg = lm_config_from_hf(hf_config.to_dict())
    ours = DecoderLM(cfg).eval()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(to_ours(hf.state_dict(), llama_key_map(cfg), shapes, "tiny llama"))
    rank, alpha = 2, 6
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    with torch.no_grad():
        for i in range(2):
            for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
                name = f"model.layers.{i}.{module}"
                linear = hf.get_submodule(name)
                a = torch.randn(rank, linear.in_features, generator=gen) * 0.3
                b = torch.randn(linear.out_features, rank, generator=gen) * 0.3
                tensors[f"base_model.model.{name}.lora_A.weight"] = a
                tensors[f"base_model.model.{name}.lora_B.weight"] = b
                linear.weight += alpha / rank * b @ a
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    config = dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(ours, tmp_path, llama_module_names())
    assert ours.blocks[1].attn.qkv.slices == {"q": (0, 16), "v": (24, 32)}
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    # and back: our save writes the very tensors transformers' module names were given
    save_adapter(ours, tmp_path / "again", llama_module_names())
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize(
    ("targets", "kwargs", "message"),
    [
        (["q_proj"], {}, "match no linear layer"),
        ([], {}, "expected a regex or a list"),
        ("blocks.(", {}, "not a valid regex"),
        (["q"], {"rank": 0}, "rank"),
        (["q"], {"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_lora_settings_raise_input_error(targets, kwargs, message):
    settings = {"rank": 2, "alpha": 4} | kwargs
    with pytest.raises(InputError, match=message):
        apply_lora(tiny_lm(), targets=targets, **settings)


def test_wrapping_twice_raises_input_error():
    model = tiny_lm()
    apply_lora(model, 2, 4, ["down"])
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, 2, 4, ["down"])


def test_saving_a_fused_layer_without_a_transformers_name_raises(tmp_path):
    model = tiny_lm()
    apply_lora(model, 2, 4, ["qkv"])
    with pytest.raises(InputError, match="no transformers name for 'blocks.0.attn.qkv'"):
        save_adapter(model, tmp_path, llama_module_names())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c, t: c.update(use_dora=True), "use_dora"),
        (lambda c, t: c.update(peft_type="IA3"), "peft_type"),
        (lambda c, t: t.update({"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(2, DIM)}), "no place"),
        (lambda c, t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(3, DIM)}), "expected \\[2, 16\\]"),
        (lambda c, t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"), "no lora_B"),
    ],
)  # fmt: skip
def test_bad_adapter_folders_raise_input_error_and_leave_the_model_alone(tmp_path, edit, message):
    source = tiny_lm()
    apply_lora(source, 2, 4, ["up"])
    save_adapter(source, tmp_path, llama_module_names())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    edit(config, tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = tiny_lm()
    with pytest.raises(InputError, match=message):
        load_adapter(target, tmp_path, llama_module_names())
    assert not any(isinstance(m, LoRALinear) for m in target.modules())


def test_missing_adapter_weights_raise_input_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="only adapter_model.bin found"):
        load_adapter(tiny_lm(), tmp_path, llama_module_names())
