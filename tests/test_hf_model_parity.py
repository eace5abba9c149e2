"""Parity of DualEncoder with transformers' CLIPModel and SiglipModel on tiny random checkpoints."""

import json

import pytest
import torch
import transformers

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_clip import clip_config_from_hf, clip_key_map, siglip_config_from_hf, siglip_key_map
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.models.dual_encoder import DualEncoder

CLIP_CASES = {
    "quickgelu-p8": dict(
        width=32, heads=4, layers=2, patch=8, image=32, proj=24, act="quick_gelu", tw=40, th=4, eos=9
    ),
    "gelu-p4-wide": dict(
        width=48, heads=3, layers=3, patch=4, image=16, proj=16, act="gelu", tw=24, th=2, eos=9
    ),
    "legacy-eos2": dict(
        width=32, heads=2, layers=1, patch=16, image=48, proj=32, act="quick_gelu", tw=32, th=4, eos=2
    ),
}


def make_clip(tmp_path, c):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=c["tw"], intermediate_size=2 * c["tw"], num_hidden_layers=2,
                         num_attention_heads=c["th"], max_position_embeddings=20, hidden_act=c["act"],
                         eos_token_id=c["eos"], pad_token_id=1, bos_token_id=0),
        vision_config=dict(hidden_size=c["width"], intermediate_size=3 * c["width"], num_hidden_layers=c["layers"],
                           num_attention_heads=c["heads"], image_size=c["image"], patch_size=c["patch"],
                           hidden_act=c["act"], layer_norm_eps=1e-6),
        projection_dim=c["proj"],
    )  # fmt: skip
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref


def token_batch(vocab, eos, length=12, pad=1):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 90), (4, length), generator=g)
    ids[:, 0] = 0
    lengths = [length, 7, 3, 10]  # padded and unpadded rows
    for row, n in enumerate(lengths):
        ids[row, n - 1] = eos
        ids[row, n:] = pad
    return ids


def load_ours(folder, config_from_hf, key_map):
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    return build_from_weights(lambda: DualEncoder(cfg), read_weights(folder), key_map(cfg), str(folder))


def assert_same_outputs(ref, model, pixels, ids):
    """Normalised embeddings and logits/scale (CLIP) or logits (SigLIP) agree within 1e-5."""
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
        img, txt = model.encode_image(pixels), model.encode_text(ids)
        logits = model.logits(img, txt)
    torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=0)
    scale = ref.logit_scale.exp().detach()
    torch.testing.assert_close(logits / scale, out.logits_per_image / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_embeddings_and_logits_match_transformers(tmp_path, case):
    c = CLIP_CASES[case]
    ref = make_clip(tmp_path, c)
    model = load_ours(tmp_path, clip_config_from_hf, clip_key_map)
    ids = token_batch(99, 98 if c["eos"] == 2 else c["eos"])  # legacy configs pool at the highest id
    assert_same_outputs(ref, model, torch.randn(3, 3, c["image"], c["image"]), ids)


def test_clip_hidden_states_and_resized_positions_match(tmp_path):
    c = CLIP_CASES["quickgelu-p8"]
    ref = make_clip(tmp_path, c)
    cfg = clip_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    model = build_from_weights(
        lambda: DualEncoder(cfg), read_weights(tmp_path), clip_key_map(cfg), str(tmp_path)
    )
    pixels = torch.randn(2, 3, 64, 64)  # twice the trained resolution: 16 patches -> 64
    with torch.no_grad():
        out = ref.vision_model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        tokens, hidden = model.visual.forward_features(pixels, output_hidden_states=True)
        emb = model.encode_image(pixels, normalize=False)
    assert tokens.shape == (2, 1 + 64, c["width"])
    assert len(hidden) == len(out.hidden_states)
    for ours, theirs in zip(hidden, out.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb, ref.visual_projection(out.pooler_output), atol=1e-5, rtol=0)


SIGLIP_CASES = {
    "map-head": dict(width=32, heads=4, layers=2, patch=8, image=32, tw=32, th=4, proj=None, head=True),
    "text-proj": dict(width=24, heads=2, layers=1, patch=4, image=16, tw=32, th=2, proj=24, head=True),
}


def make_siglip(tmp_path, c):
    torch.manual_seed(0)
    text = dict(
        vocab_size=64,
        hidden_size=c["tw"],
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=c["th"],
        max_position_embeddings=16,
    )
    if c["proj"]:
        text["projection_size"] = c["proj"]
    cfg = transformers.SiglipConfig(
        text_config=text,
        vision_config=dict(hidden_size=c["width"], intermediate_size=2 * c["width"] + 1, num_hidden_layers=c["layers"],
                           num_attention_heads=c["heads"], image_size=c["image"], patch_size=c["patch"],
                           vision_use_head=c["head"]),
    )  # fmt: skip
    ref = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # transformers zero-initialises these; give them checkpoint-like values
        ref.logit_scale.fill_(4.7)
        ref.logit_bias.fill_(-12.5)
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("case", SIGLIP_CASES)
def test_siglip_embeddings_and_logits_match_transformers(tmp_path, case):
    c = SIGLIP_CASES[case]
    ref = make_siglip(tmp_path, c)
    model = load_ours(tmp_path, siglip_config_from_hf, siglip_key_map)
    assert_same_outputs(ref, model, torch.randn(3, 3, c["image"], c["image"]), torch.randint(0, 64, (4, 16)))


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path):
    make_clip(tmp_path, CLIP_CASES["quickgelu-p8"])  # visual_projection is [24, 32]
    cfg = clip_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    weights = read_weights(tmp_path)
    weights["visual_projection.weight"] = weights["visual_projection.weight"].T.contiguous()
    with pytest.raises(InputError, match=r"visual_projection.weight.*shape \[32, 24\], expected \[24, 32\]"):
        build_from_weights(lambda: DualEncoder(cfg), weights, clip_key_map(cfg), str(tmp_path))
