"""open_clip checkpoints: tensor names and shapes as open_clip writes them, round trips, bad configs, the tokenizer.

open_clip is not installed here; the expected names below are read off open_clip 3.3's source
(model.py CLIP/CustomTextCLIP, transformer.py VisionTransformer, TextTransformer, ResidualAttentionBlock).
Numerical parity with open_clip itself is benchmarks/open_clip_parity.py, run in .bench-env.
"""

import gzip
import json

import pytest
import torch
from safetensors.torch import save_file

from mmlm.checkpoints.keymap import to_ours, to_theirs
from mmlm.checkpoints.open_clip import (
    CONFIG_NAME,
    PICKLE_NAME,
    WEIGHTS_NAME,
    load_open_clip_weights,
    open_clip_config,
    open_clip_key_map,
    open_clip_tokenizer,
)
from mmlm.errors import InputError
from mmlm.models.dual_encoder import DualEncoder

SMALL = dict(
    embed_dim=24,
    quick_gelu=True,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8),
    text_cfg=dict(context_length=12, vocab_size=50, width=16, heads=2, layers=3),
)
CUSTOM = dict(
    embed_dim=16,
    custom_text=True,
    init_logit_bias=-10.0,
    vision_cfg=dict(
        image_size=16, patch_size=4, width=24, layers=1, head_width=12, no_ln_pre=True, mlp_ratio=2.0
    ),
    text_cfg=dict(context_length=8, vocab_size=30, width=20, heads=4, layers=2, proj_bias=True),
)


def block_shapes(prefix: str, width: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
    # ResidualAttentionBlock: ln_1, nn.MultiheadAttention (in_proj packs q, k, v), ln_2, mlp.c_fc / mlp.c_proj
    shapes = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        shapes |= {
            b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (mlp, width), b + "mlp.c_fc.bias": (mlp,),
            b + "mlp.c_proj.weight": (width, mlp), b + "mlp.c_proj.bias": (width,),
        }  # fmt: skip
    return shapes


def expected_open_clip_shapes(model_cfg: dict) -> dict[str, tuple[int, ...]]:
    """open_clip's state dict for `model_cfg` (CLIP, or CustomTextCLIP with `text.`), written out by hand."""
    v, t, e = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    w, p, grid = v["width"], v["patch_size"], v["image_size"] // v["patch_size"]
    shapes = {
        "visual.conv1.weight": (w, 3, p, p),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w),
    }
    if not v.get("no_ln_pre"):
        shapes |= {"visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,)}
    shapes |= block_shapes("visual.", w, v["layers"], int(w * v.get("mlp_ratio", 4.0)))
    shapes |= {"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,), "visual.proj": (w, e)}
    tw, pre = t["width"], "text." if model_cfg.get("custom_text") else ""
    shapes |= {
        pre + "token_embedding.weight": (t["vocab_size"], tw),
        pre + "positional_embedding": (t["context_length"], tw),
        pre + "ln_final.weight": (tw,),
        pre + "ln_final.bias": (tw,),
    }
    shapes |= block_shapes(pre, tw, t["layers"], int(tw * t.get("mlp_ratio", 4.0)))
    if t.get("proj_bias"):  # nn.Linear(width, embed_dim)
        shapes |= {pre + "text_projection.weight": (e, tw), pre + "text_projection.bias": (e,)}
    else:  # nn.Parameter(width, embed_dim), applied as x @ text_projection
        shapes[pre + "text_projection"] = (tw, e)
    shapes["logit_scale"] = ()
    if "init_logit_bias" in model_cfg:
        shapes["logit_bias"] = ()
    return shapes


def random_model(model_cfg: dict) -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder(open_clip_config(model_cfg)).eval()
    with torch.no_grad():  # no tensor left at an init value that a wrong mapping could reproduce
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("model_cfg", [SMALL, CUSTOM], ids=["clip", "custom-text"])
def test_export_has_open_clips_names_and_shapes_and_round_trips_exactly(model_cfg):
    model = random_model(model_cfg)
    rules = open_clip_key_map(model.cfg, custom_text=model_cfg.get("custom_text", False))
    ours = model.state_dict()
    theirs = to_theirs(ours, rules)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == expected_open_clip_shapes(model_cfg)
    back = to_ours(theirs, rules, {k: v.shape for k, v in ours.items()}, "test")
    assert back.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name


def test_exported_matrices_act_as_open_clip_applies_them():
    model = random_model(SMALL)
    theirs = to_theirs(model.state_dict(), open_clip_key_map(model.cfg))
    x = torch.randn(3, 32)
    # open_clip: pooled @ visual.proj, and nn.MultiheadAttention's in_proj rows are q, then k, then v
    torch.testing.assert_close(x @ theirs["visual.proj"], model.visual.proj(x), rtol=0, atol=1e-5)
    block = model.visual.transformer.blocks[0].attn
    k = theirs["visual.transformer.resblocks.0.attn.in_proj_weight"].chunk(3)[1]
    torch.testing.assert_close(x @ k.T, block.qkv(x)[:, 32:64] - block.qkv.bias[32:64], rtol=0, atol=1e-5)
    t = torch.randn(2, 16)
    torch.testing.assert_close(t @ theirs["text_projection"], model.text.proj(t), rtol=0, atol=1e-5)


def test_config_of_open_clips_vit_b_32_quickgelu():
    # open_clip/model_configs/ViT-B-32-quickgelu.json
    cfg = open_clip_config(
        {"embed_dim": 512, "quick_gelu": True,
         "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    )  # fmt: skip
    v, t = cfg.vision, cfg.text
    # heads = width // head_width (64); MLP width = width · mlp_ratio (4); end token = highest id; pad id 0
    assert (v.heads, v.mlp_dim, v.act, v.pool, v.embed_dim) == (12, 3072, "quick_gelu", "cls", 512)
    assert (t.heads, t.mlp_dim, t.causal, t.pool) == (8, 2048, True, "eos_argmax")
    assert (t.eos_token_id, t.pad_token_id, v.norm_eps, t.norm_eps) == (49407, 0, 1e-5, 1e-5)
    assert cfg.family == "clip" and cfg.logit_bias_init is None
    assert open_clip_config({**SMALL, "quick_gelu": False}).text.act == "gelu"  # open_clip's nn.GELU (erf)
    assert cfg.vision.patch_dropout == 0.0
    flip = {**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "patch_dropout": 0.5}}  # a FLIP-style config
    # fine-tuning it drops patches as open_clip does
    assert open_clip_config(flip).vision.patch_dropout == 0.5


def write_folder(folder, model_cfg, tensors):
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_open_clip_folder_gives_the_same_embeddings(tmp_path, prefix):
    model = random_model(CUSTOM)
    theirs = to_theirs(model.state_dict(), open_clip_key_map(model.cfg, custom_text=True))
    write_folder(tmp_path, CUSTOM, {prefix + k: v for k, v in theirs.items()})
    loaded = load_open_clip_weights(tmp_path)
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(ids), model.encode_text(ids), rtol=0, atol=0)
    assert loaded.logit_bias is not None and loaded.cfg.family == "siglip"


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(vision_cfg=dict(timm_model_name="vit_base_patch16_224")), "timm_model_name"),
        (dict(vision_cfg=dict(layers=[3, 4, 6, 3], width=64)), "ModifiedResNet"),
        (dict(vision_cfg=dict(attentional_pool=True)), "attentional_pool"),
        (dict(vision_cfg=dict(pool_type="avg", final_ln_after_pool=True)), "final_ln_after_pool"),
        (dict(vision_cfg=dict(ls_init_value=1e-5)), "ls_init_value"),
        (dict(vision_cfg=dict(image_size=[32, 48])), "image_size"),
        (dict(text_cfg=dict(hf_model_name="xlm-roberta-base")), "hf_model_name"),
        (dict(text_cfg=dict(embed_cls=True)), "embed_cls"),
        (dict(text_cfg=dict(pool_type="first")), "pool_type"),
        (dict(multimodal_cfg=dict(width=32)), "multimodal_cfg"),
    ],
)
def test_unsupported_options_are_refused_by_name(change, option):
    cfg = {**SMALL, **{k: {**SMALL.get(k, {}), **v} if isinstance(v, dict) else v for k, v in change.items()}}
    with pytest.raises(InputError, match=option):
        open_clip_config(cfg)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match=CONFIG_NAME):
        load_open_clip_weights(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model_cfg": SMALL}))
    (tmp_path / PICKLE_NAME).write_bytes(b"not read")
    with pytest.raises(InputError, match="safetensors only"):
        load_open_clip_weights(tmp_path)
    theirs = to_theirs(random_model(SMALL).state_dict(), open_clip_key_map(open_clip_config(SMALL)))
    del theirs["visual.proj"]
    write_folder(tmp_path, SMALL, theirs)
    with pytest.raises(InputError, match="'visual.proj' is missing"):
        load_open_clip_weights(tmp_path)


def test_tokenizer_follows_simple_tokenizers_bpe_on_a_tiny_merges_file(tmp_path):
    # vocab: 256 byte symbols, the same with </w>, one token per merge, then <start_of_text>, <end_of_text>
    path = tmp_path / "bpe.txt.gz"
    path.write_bytes(gzip.compress(b"#version: 0.2\nh e\nl o</w>\nhe l\nhel lo</w>"))  # no final newline:
    # SimpleTokenizer would read one as an empty merge and shift the special ids by one
    tokenizer = open_clip_tokenizer(path)
    # "Hello’s  World" -> uncurl, lower: "hello's world" -> words hello | 's | world
    # hello: h e -> he; l o</w> -> lo</w>; he l -> hel; hel lo</w> -> hello</w> = 512 + 3
    # 's: ' is byte 39 -> symbol 39 - 33 = 6; s</w> is 256 + (115 - 33); world: no merge applies
    ids = tokenizer.encode("Hello’s  World").ids
    assert ids == [516, 515, 6, 256 + 82, 86, 78, 81, 75, 256 + 67, 517]
    assert tokenizer.decode(ids) == "hello 's world "  # SimpleTokenizer.decode: each </w> becomes a space


def test_mmlm_load_reads_an_open_clip_folder_with_its_tokenizer(tmp_path):
    import mmlm
    from mmlm.checkpoints.open_clip import write_open_clip_tokenizer

    config = {**SMALL, "text_cfg": {**SMALL["text_cfg"], "vocab_size": 520}}  # the tiny BPE below has 518 ids
    model = random_model(config)
    write_folder(tmp_path, config, to_theirs(model.state_dict(), open_clip_key_map(model.cfg)))
    with pytest.raises(InputError, match="write_open_clip_tokenizer"):
        mmlm.load(tmp_path)
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(b"#version: 0.2\nh e\nl o</w>\nhe l\nhel lo</w>"))
    write_open_clip_tokenizer(bpe, tmp_path, context_length=SMALL["text_cfg"]["context_length"])
    loaded = mmlm.load(tmp_path)
    ids = loaded.tokenizer(["hello world"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_text(["hello world"]), model.encode_text(ids), rtol=0, atol=0
        )
