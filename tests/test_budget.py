"""`mmlm budget`: the chapter's token arithmetic, FLOP formulas against hand counts and torch's FlopCounterMode,
and the command on config files alone (no weights, nothing downloaded)."""

import dataclasses
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmlm.cli import main
from mmlm.cli.budget import spec_from_config
from mmlm.fusion import ConnectorConfig, build_connector
from mmlm.fusion.projector import mlp_projector_flops
from mmlm.layers import Attention
from mmlm.layers.flops import linear_flops, self_attention_flops
from mmlm.models.budget import (
    Backbone,
    ImageInput,
    LMShape,
    causal_pairs,
    lm_prefill_flops,
    plan_budget,
    vision_tower_cost,
)
from mmlm.models.decoder_lm import DecoderLM, LMConfig
from mmlm.models.vision import VisionConfig, VisionTransformer
from mmlm.models.vlm import VisionLanguageModel, VLMConfig

# llava-hf/llava-1.5-7b-hf's config.json as the hub has it (Llama defaults fill the rest of text_config)
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
    "torch_dtype": "float16", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
    "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
                    "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}  # fmt: skip
TINY_LLAVA = {
    "model_type": "llava", "torch_dtype": "float32", "image_token_index": 99,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100},
}  # fmt: skip


def flop_count(fn) -> int:
    """FLOPs that torch's FlopCounterMode sees (2 per MAC). On CPU it sees attention only through the math
    backend, whose matrix products it counts; the fused CPU kernel is not in its registry."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def budget_json(capsys, *argv) -> dict:
    assert main(["budget", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- the chapter's arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "patches"), [(224, 196), (448, 784)])
def test_vit_b16_patch_tokens_grow_with_the_square_of_resolution(size, patches):
    vit_b16 = VisionConfig()  # 224 px, patch 16, 768 wide, 12 layers
    plan = plan_budget(Backbone(vit_b16, encoder_head=True), ImageInput(size))
    assert (plan.patches, plan.vision.sequence) == (patches, patches + 1)  # 14² or 28², plus the class token


def test_llava_15_sends_576_tokens_at_336_px():
    plan = plan_budget(spec_from_config(LLAVA_15_7B, "llava").backbone, ImageInput(336))
    # CLIP ViT-L/14-336: 24² patches + class token; layer −2 runs 23 of 24 blocks; "default" drops the class token
    assert (plan.vision.sequence, plan.vision.blocks, plan.features) == (577, 23, 576)
    assert plan.own.visual_tokens == 576


# ---- FLOP formulas ---------------------------------------------------------------------------------------


def test_linear_and_attention_flops_equal_a_hand_count():
    # a 4 -> 5 linear map on 3 tokens: 3·4·5 = 60 multiply-accumulates = 120 FLOPs
    assert linear_flops(3, 4, 5) == 120 == flop_count(lambda: torch.nn.Linear(4, 5)(torch.randn(3, 4)))
    # self-attention, 3 tokens, width 4, 2 heads of 2: q,k,v 3·4·12 MACs, q·kᵀ and A·v 2·(3·3·2·2), out 3·4·4
    hand = 2 * (3 * 4 * 12 + 2 * 3 * 3 * 2 * 2 + 3 * 4 * 4)
    assert self_attention_flops(3, 4, 2, 2, 2, pairs=9) == hand == 528
    assert flop_count(lambda: Attention(4, heads=2)(torch.randn(1, 3, 4))) == hand
    assert causal_pairs(4) == 1 + 2 + 3 + 4 and causal_pairs(4, window=2) == 1 + 2 + 2 + 2


VIT_VARIANTS = {
    "clip": {},
    "siglip_map_head": dict(class_token=False, pre_norm=False, patch_bias=True, pool="map", embed_dim=None),
    "conv_stem": dict(stem="conv"),
    "tome_r2": dict(merge_tokens=2),
    "tome_r3_no_class_token": dict(merge_tokens=3, class_token=False, pool="mean"),
}


@pytest.mark.parametrize(
    ("variant", "size"),
    [("clip", 32), ("clip", 48), ("siglip_map_head", 32), ("conv_stem", 48), ("tome_r2", 48),
     ("tome_r3_no_class_token", 32)],
)  # fmt: skip
def test_vit_flops_equal_torch_flop_counter(variant, size):
    tiny = dict(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_dim=64, embed_dim=16)
    cfg = VisionConfig(**{**tiny, **VIT_VARIANTS[variant]})
    model = VisionTransformer(cfg).eval()
    # batch 2: on CPU mmlm sends a single row through a linear as two (layers/linear.py), which FlopCounterMode
    # would count twice
    pixels = torch.randn(2, 3, size, size)
    full = vision_tower_cost(cfg, size, cfg.layers, cfg.merge_tokens, head=True).flops
    assert flop_count(lambda: model(pixels)) == 2 * full
    vlm_read = vision_tower_cost(cfg, size, blocks=2, merge_tokens=cfg.merge_tokens).flops  # layer −2
    assert flop_count(lambda: model.layer_features(pixels, [-2])) == 2 * vlm_read


@pytest.mark.parametrize("window", [None, 4])
def test_lm_prefill_flops_count_the_causal_half(window):
    cfg = LMConfig(vocab_size=50, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, sliding_window=window)
    model, tokens = DecoderLM(cfg).eval(), 10
    counted = flop_count(lambda: model(inputs_embeds=torch.randn(2, tokens, 32), last_only=True))
    # the math kernel multiplies the whole T×T square and masks it; the plan counts the pairs the mask allows
    masked = 4 * (tokens * tokens - causal_pairs(tokens, window)) * cfg.heads * cfg.dim_per_head * cfg.layers
    assert counted == 2 * (lm_prefill_flops(LMShape.from_config(cfg), tokens) + masked)


def test_mlp_projector_flops_equal_torch_flop_counter():
    projector = build_connector(ConnectorConfig(kind="mlp"), 24, 40)
    assert flop_count(lambda: projector(torch.randn(2, 9, 24))) == 2 * mlp_projector_flops(9, 24, 40)


@pytest.mark.parametrize("connector", [ConnectorConfig(kind="mlp"), ConnectorConfig(kind="pixel_shuffle")])
def test_planned_visual_tokens_equal_the_models(connector):
    cfg = VLMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_dim=64,
                                        embed_dim=None),
                    lm=LMConfig(vocab_size=100, width=32, layers=1, heads=4, kv_heads=4, mlp_dim=64),
                    connector=connector, image_token_id=99)  # fmt: skip
    plan = plan_budget(spec_from_config({"mmlm_version": 1, "architecture": "vlm",
                                         "config": dataclasses.asdict(cfg)}, "mmlm").backbone, ImageInput(32))  # fmt: skip
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        features = model.image_features(torch.randn(1, 3, 32, 32))
    assert plan.own.visual_tokens == model.image_tokens == features.shape[1]
    assert plan.own.connector_flops == flop_count(lambda: model.connector(torch.randn(1, 16, 32)))


# ---- the command -----------------------------------------------------------------------------------------


def test_llava_15_7b_config_alone(tmp_path, capsys):
    out = budget_json(capsys, "--config", write(tmp_path, LLAVA_15_7B))
    own = out["styles"][0]
    assert (own["kind"], own["visual_tokens"], out["kv_dtype"]) == ("mlp", 576, "float16")
    # 2 (K, V) × 32 layers × 32 KV heads × 128 × (576 + 32 text tokens) × 2 bytes = 304 MiB
    assert own["kv_bytes"] == 2 * 32 * 32 * 128 * 608 * 2 == 304 * 2**20
    styles = {s["kind"]: s for s in out["styles"]}
    assert styles["pixel_shuffle"]["visual_tokens"] == 144  # 576 / 2²
    assert styles["qformer"]["visual_tokens"] == 32 and styles["perceiver"]["visual_tokens"] == 64
    assert (styles["cross_attention"]["visual_tokens"], styles["cross_attention"]["media_tokens"]) == (1, 64)
    assert styles["unified"]["visual_tokens"] == 576 and styles["unified"]["connector_flops"] == 0
    assert main(["budget", "--config", str(tmp_path / "config.json")]) == 0
    table = capsys.readouterr().out
    assert "576 visual + 32 text" in table and "304.0 MiB" in table


def test_tiles_and_token_merging(tmp_path, capsys):
    config = write(tmp_path, LLAVA_15_7B)
    tiled = budget_json(capsys, "--config", config, "--tiles", "2x2")
    assert tiled["styles"][0]["visual_tokens"] == (2 * 2 + 1) * 576  # 4 tiles + the global view = 2880
    merged = budget_json(capsys, "--config", config, "--merge-tokens", "8")
    assert (
        merged["styles"][0]["visual_tokens"] == 577 - 23 * 8 - 1
    )  # r per block over 23 blocks, class dropped
    both = budget_json(capsys, "--config", config, "--tiles", "2x2", "--merge-tokens", "8")
    assert both["styles"][0]["visual_tokens"] == 5 * 392
    pixel_shuffle = next(s for s in merged["styles"] if s["kind"] == "pixel_shuffle")
    assert pixel_shuffle["visual_tokens"] is None  # merged tokens are no longer a grid
    assert merged["vision"]["flops"] < budget_json(capsys, "--config", config)["vision"]["flops"]


def test_bare_vision_configs_and_blip2(tmp_path, capsys):
    clip = {"model_type": "clip", "vision_config": {"patch_size": 16}, "text_config": {}}
    assert budget_json(capsys, "--config", write(tmp_path, clip), "--image-size", 448)["patches"] == 784
    siglip = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14}
    out = budget_json(capsys, "--config", write(tmp_path, siglip))
    assert (out["patches"], out["vision"]["sequence"], out["styles"]) == (729, 729, [])  # 27², no class token
    blip2 = {"model_type": "blip-2", "num_query_tokens": 32, "text_config": {"model_type": "opt"}}
    own = budget_json(capsys, "--config", write(tmp_path, blip2))["styles"][0]
    assert (own["style"], own["visual_tokens"]) == ("qformer K=32", 32)


def test_measure_on_a_tiny_config(tmp_path, capsys):
    out = budget_json(capsys, "--config", write(tmp_path, TINY_LLAVA), "--measure", "--runs", "2",
                      "--merge-tokens", "2", "--tiles", "1x2")  # fmt: skip
    measured = out["measured"]
    assert measured["visual_tokens"] == out["styles"][0]["visual_tokens"] == 3 * (17 - 2 * 2 - 1)
    assert all(measured[k] > 0 for k in ("vision_ms", "connector_ms", "lm_prefill_ms"))
    assert main(["budget", "--config", str(tmp_path / "config.json"), "--measure", "--runs", "1"]) == 0
    assert "ms" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["qformer", "perceiver", "cross_attention", "unified"])
def test_measure_times_every_fusion_style_of_an_mmlm_config(kind, tmp_path, capsys):
    from mmlm.fusion import ConnectorConfig
    from mmlm.models.decoder_lm import LMConfig
    from mmlm.models.vlm import VLMConfig

    vision = VisionConfig(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=None
    )
    lm = LMConfig(vocab_size=300, width=32, layers=2, heads=2, kv_heads=1, mlp_dim=64, max_positions=128)
    connector = ConnectorConfig(kind=kind, num_queries=4, heads=2, codebook_size=16)
    cfg = VLMConfig(vision, lm, connector, image_token_id=299, feature_layers=[-1])
    config = {"mmlm_version": 1, "architecture": "vlm", "config": dataclasses.asdict(cfg)}
    out = budget_json(capsys, "--config", write(tmp_path, config), "--measure", "--runs", "1")
    tokens = {"qformer": 4, "perceiver": 4, "cross_attention": 1, "unified": 16}[kind]
    assert out["measured"]["visual_tokens"] == out["styles"][0]["visual_tokens"] == tokens
    assert all(out["measured"][k] > 0 for k in ("vision_ms", "connector_ms", "lm_prefill_ms"))


def test_model_folder_reads_its_config_and_measures_its_weights(tmp_path, capsys):
    from fixtures_vlm import write_tiny_llava

    write_tiny_llava(tmp_path)
    out = budget_json(capsys, "--model", tmp_path, "--measure", "--runs", "1")
    assert out["measured"]["weights"] == "loaded"
    assert out["measured"]["visual_tokens"] == out["styles"][0]["visual_tokens"] == 16


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "{tmp}/missing.json"], "missing.json not found"),
        (["--config", "{tmp}/unknown.json"], "model_type 'bert' is not supported"),
        (["--config", "{tmp}/lm.json"], "text-only LM"),
        (["--config", "{tmp}/llava.json", "--tiles", "2by2"], "--tiles: got '2by2'"),
        (["--config", "{tmp}/llava.json", "--tiles", "0x2"], "--tiles: got '0x2'"),
        (
            ["--config", "{tmp}/llava.json", "--image-size", "10"],
            "--image-size: got 10; expected at least 14",
        ),
        (["--config", "{tmp}/llava.json", "--merge-tokens", "-1"], "--merge-tokens: got -1"),
        (["--config", "{tmp}/llava.json", "--dtype", "int3"], "--dtype: got 'int3'"),
        (["--config", "{tmp}/llava.json", "--measure"], "over the 4 GiB limit"),
        (["--model", "{tmp}/nowhere"], "nowhere not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    write(tmp_path, {"model_type": "bert"}, "unknown.json")
    write(tmp_path, {"model_type": "llama"}, "lm.json")
    write(tmp_path, LLAVA_15_7B, "llava.json")
    assert main(["budget", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmlm: error: ") and expected in err and "\n" not in err


@pytest.mark.parametrize(
    "kind, options",
    [("qformer", {"num_queries": 5, "depth": 3, "heads": 2, "cross_attention_frequency": 2}),
     ("perceiver", {"num_queries": 6, "depth": 2, "heads": 2})],
)  # fmt: skip
def test_connector_formulas_count_what_mmlm_builds(kind, options):
    from mmlm.fusion import ConnectorConfig, build_connector
    from mmlm.fusion.perceiver import perceiver_resampler_flops
    from mmlm.fusion.qformer import qformer_flops

    c = ConnectorConfig(kind=kind, **options)
    torch.manual_seed(0)
    connector = build_connector(c, 24, 40)
    features = torch.randn(2, 9, 24)  # batch 2: see the ViT test above
    if kind == "qformer":
        expected = qformer_flops(9, 24, 40, c)
    else:
        expected = perceiver_resampler_flops(9, 24, c) + 6 * 2 * 24 * 40  # the resampler, then the projection
    assert flop_count(lambda: connector(features)) == 2 * expected


def test_gated_cross_attention_formula_counts_the_block_mmlm_builds():
    from mmlm.fusion import ConnectorConfig
    from mmlm.fusion.flamingo import gated_cross_attention_flops, gated_cross_attention_layers
    from mmlm.models.decoder_lm import LMConfig
    from mmlm.models.vlm import VisionLanguageModel, VLMConfig

    lm = LMConfig(vocab_size=50, width=32, layers=5, heads=4, kv_heads=2, mlp_dim=48)
    vision = VisionConfig(
        image_size=16, patch_size=8, width=24, layers=1, heads=2, mlp_dim=32, embed_dim=None
    )
    cfg = VLMConfig(vision, lm, ConnectorConfig(kind="cross_attention", num_queries=3, heads=2,
                                                cross_attn_every_n_layers=2), image_token_id=49)  # fmt: skip
    fusion = VisionLanguageModel(cfg).connector
    assert len(fusion.blocks) == gated_cross_attention_layers(5, 2) == 3  # before layers 0, 2, 4
    shape = LMShape(width=32, layers=5, heads=4, kv_heads=2, head_dim=8, mlp_dim=48, vocab_size=50)
    text, media = torch.randn(2, 7, 32), torch.randn(2, 6, 24)
    counted = flop_count(lambda: fusion.blocks["0"](text, media, torch.ones(2, 7, 6, dtype=torch.bool)))
    assert counted == 2 * gated_cross_attention_flops(7, 6, shape, 24)


def test_video_duration_and_sampling_rate_set_the_frames(tmp_path, capsys):
    config = write(tmp_path, LLAVA_15_7B)
    out = budget_json(capsys, "--config", config, "--video-seconds", "10", "--fps", "2")
    assert out["image"]["frames"] == 20  # t = 0, 0.5, ..., 9.5 s
    styles = {s["style"].split()[0]: s["visual_tokens"] for s in out["styles"]}
    assert styles["mlp"] == 20 * 576 and styles["perceiver"] == 64  # the resampler reads all frames at once
    capped = budget_json(
        capsys, "--config", config, "--video-seconds", "600", "--fps", "1", "--max-frames", "32"
    )
    assert capped["image"]["frames"] == 32
    assert main(["budget", "--config", str(config), "--fps", "2"]) == 2
    assert "--fps needs --video-seconds" in capsys.readouterr().err
    assert main(["budget", "--config", str(config), "--video-seconds", "-1", "--fps", "2"]) == 2
    assert "expected positive numbers" in capsys.readouterr().err


def test_video_pool_divides_the_per_frame_styles_slots(tmp_path, capsys):
    from mmlm.models.decoder_lm import LMConfig

    out = budget_json(capsys, "--config", write(tmp_path, LLAVA_15_7B), "--frames", "20", "--video-pool", "4")
    styles = {s["style"].split()[0]: s["visual_tokens"] for s in out["styles"]}
    assert (styles["mlp"], styles["qformer"], styles["perceiver"]) == (5 * 576, 5 * 32, 64)
    assert out["vision_flops"] == 20 * out["vision"]["flops"]  # the tower still encodes every frame
    vision = VisionConfig(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=None
    )
    lm = LMConfig(vocab_size=300, width=32, layers=2, heads=2, kv_heads=1, mlp_dim=64, max_positions=256)
    cfg = VLMConfig(
        vision, lm, ConnectorConfig(kind="mlp"), image_token_id=299, feature_layers=[-1], video_pool=2
    )
    config = write(
        tmp_path, {"mmlm_version": 1, "architecture": "vlm", "config": dataclasses.asdict(cfg)}, "own.json"
    )
    out = budget_json(capsys, "--config", config, "--frames", "5", "--measure", "--runs", "1")
    assert out["measured"]["visual_tokens"] == out["styles"][0]["visual_tokens"] == 3 * 16  # 2 + 2 + 1 frames
    unpooled = budget_json(capsys, "--config", config, "--frames", "5", "--video-pool", "1")
    assert unpooled["styles"][0]["visual_tokens"] == 5 * 16
    assert main(["budget", "--config", str(config), "--video-pool", "0"]) == 2
    assert "--video-pool" in capsys.readouterr().err


def test_an_audio_text_model_is_refused_with_one_line(tmp_path, capsys):
    from mmlm.models.audio_encoder import AudioConfig
    from mmlm.models.dual_encoder import DualEncoderConfig

    cfg = DualEncoderConfig(audio=AudioConfig(width=32, layers=1, heads=2, mlp_dim=64, max_frames=50))
    config = write(
        tmp_path, {"mmlm_version": 1, "architecture": "dual_encoder", "config": dataclasses.asdict(cfg)}
    )
    assert main(["budget", "--config", str(config)]) == 2
    assert "audio-text model has no vision tower" in capsys.readouterr().err
