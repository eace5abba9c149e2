"""`mmlm budget --train`: parameter counts against transformers' model, FSDP sharding, LoRA, bad input."""

import json

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmlm.cli import main
from mmlm.cli.budget import spec_from_config
from mmlm.models.train_budget import TrainSetup, plan_training


def tiny_llava() -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128),
        vocab_size=128, image_token_index=120,
    )  # fmt: skip


def plan(**setup):
    spec = spec_from_config(tiny_llava().to_dict(), "tiny")
    return plan_training(
        spec.buildable, spec.backbone.lm, 5, TrainSetup(**{"batch": 2, "sequence": 16, **setup})
    )


def test_parameter_count_equals_transformers_numel():
    reference = sum(p.numel() for p in LlavaForConditionalGeneration(tiny_llava()).parameters())
    b = plan(precision="fp32")
    assert b.parameters == b.trainable_parameters == reference
    assert (b.weights_bytes, b.gradients_bytes, b.optimizer_bytes) == (
        4 * reference,
        4 * reference,
        8 * reference,
    )


def test_bf16_mixed_keeps_fp32_master_and_moments():
    b = plan(precision="bf16-mixed")
    assert (b.weights_bytes, b.gradients_bytes, b.optimizer_bytes) == (2 * b.parameters, 2 * b.parameters,
                                                                       12 * b.parameters)  # fmt: skip


def test_fsdp_divides_the_sharded_parts_by_n():
    ddp, fsdp = plan(devices=4), plan(devices=4, sharding="fsdp")
    assert ddp.weights_bytes == plan().weights_bytes  # DDP replicates
    for part in ("weights_bytes", "gradients_bytes", "optimizer_bytes"):
        assert getattr(fsdp, part) == -(-getattr(ddp, part) // 4)
    assert fsdp.gathered_bytes > 0 and ddp.gathered_bytes == 0
    assert fsdp.activations_bytes == ddp.activations_bytes


def test_lora_trains_only_its_parameters():
    full, lora = plan(), plan(lora_rank=4)
    # per LM layer: fused qkv (A 3·4·64, B (64+32+32)·4) and out (A 4·64, B 64·4); 2 layers
    assert lora.trainable_parameters == 2 * (3 * 4 * 64 + 128 * 4 + 4 * 64 + 64 * 4)
    assert lora.parameters == full.parameters + lora.trainable_parameters
    assert lora.gradients_bytes == 2 * lora.trainable_parameters
    assert lora.optimizer_bytes == 12 * lora.trainable_parameters
    assert lora.vision_activations_bytes == 0 < full.vision_activations_bytes


def test_checkpointing_keeps_fewer_activations():
    b = plan(sequence=64)
    assert b.activations_checkpointed_bytes < b.activations_bytes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--devices", "0"], "--devices: got 0; expected at least 1"),
        (["--batch-size", "0"], "--batch-size: got 0; expected at least 1"),
        (["--sharding", "zero"], "--sharding: got 'zero'; expected one of ['ddp', 'fsdp']"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_llava().to_dict()))
    assert main(["budget", "--train", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(message) and "\n" not in err


def test_cli_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_llava().to_dict()))
    main(["budget", "--train", "--config", str(config), "--seq-len", "16", "--batch-size", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == plan().parameters
    assert out["total_bytes"] == plan().total_bytes(False)
