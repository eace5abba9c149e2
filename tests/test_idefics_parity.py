"""Idefics (v1) against transformers' IdeficsForVisionText2Text and IdeficsProcessor: prompts, pixels, media mask,
logits and greedy generation on tiny random checkpoints, and the few-shot case where each text span sees only its
latest image."""

import json

import pytest
import torch
from fixtures_idefics import write_tiny_idefics
from PIL import Image
from skimage import data

import mmlm
from mmlm.cli import main
from mmlm.errors import InputError

transformers = pytest.importorskip("transformers")

# two configurations: a gated block before every layer, resampler and q/k norms on; before every second
# layer, no resampler (the blocks read the tower's tokens), one α per channel
CONFIGS = {
    "every-layer-resampler": dict(layers=2, cross_layer_interval=1, use_resampler=True, qk_layer_norms=True),
    "every-2nd-no-resampler": dict(
        layers=4, cross_layer_interval=2, use_resampler=False, alpha_type="vector"
    ),
}
FEW_SHOT = "User: <image> What is this? Assistant: a person. User:<image><image> And these? Assistant:"
FEW_SHOT_ITEMS = ["User:", 0, "What is this? Assistant: a person. User:", 1, 2, "And these? Assistant:"]


def _photos() -> list[Image.Image]:
    # several sizes and aspect ratios: 512x512, 400x400 crop, 300x451, 512x512 grey
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()[:, :400]),
            Image.fromarray(data.chelsea()), Image.fromarray(data.camera()).convert("RGB")]  # fmt: skip


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_tiny_idefics(folder, **CONFIGS[request.param])
    processor = transformers.IdeficsProcessor(
        transformers.IdeficsImageProcessorPil.from_pretrained(folder),
        transformers.AutoTokenizer.from_pretrained(folder, padding_side="left"),
    )
    return mmlm.load(folder), reference, processor, folder


def _items(items: list, photos: list[Image.Image]) -> list:
    return [photos[i] if isinstance(i, int) else i for i in items]


def test_prompt_pixels_and_media_mask_match(pair) -> None:
    ours, _, processor, _ = pair
    photos = _photos()[:3]
    theirs = processor(text=_items(FEW_SHOT_ITEMS, photos), return_tensors="pt")
    batch = ours.processor(FEW_SHOT, photos)
    assert batch["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(batch["pixel_values"], theirs["pixel_values"][0], rtol=0, atol=1e-6)
    media = ours.model.prepare(batch["input_ids"], batch["pixel_values"])[1]
    latents = media.tokens.shape[1] // 3
    expected = (
        theirs["image_attention_mask"].bool().repeat_interleave(latents, dim=-1)
    )  # [B, T, 3] -> [B, T, 3L]
    assert torch.equal(media.mask, expected)


def test_logits_match(pair) -> None:
    ours, reference, processor, _ = pair
    photos = _photos()[:3]
    theirs = processor(text=_items(FEW_SHOT_ITEMS, photos), return_tensors="pt")
    batch = ours.processor(FEW_SHOT, photos)
    with torch.no_grad():
        expected = reference(**theirs).logits
        got = ours.model(batch["input_ids"], batch["pixel_values"]).logits
    assert got.shape == expected.shape  # the two added tokens are the vocabulary's last rows
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_each_span_sees_only_its_latest_image(pair) -> None:
    ours, reference, processor, _ = pair
    a, b, c, d = _photos()
    prompt = "<image> A photo of <image> a cat, and then"
    ids = ours.processor(prompt, [a, c])["input_ids"]
    first, second = (ids[0] == ours.config.image_token_id).nonzero()[:, 0].tolist()
    # the first gated block reads the token embeddings, before any self-attention mixes positions, so its
    # output at a position shows exactly which image that position's cross-attention read
    seen = []
    hook = ours.model.connector.blocks["0"].register_forward_hook(lambda m, args, out: seen.append(out[0]))
    logits = {}
    with torch.no_grad():
        for name, pics in (("ac", (a, c)), ("bc", (b, c)), ("ad", (a, d))):
            logits[name] = ours.model(ids, ours.processor(prompt, list(pics))["pixel_values"]).logits[0]
        swapped = reference(
            **processor(text=[b, "A photo of", c, "a cat, and then"], return_tensors="pt")
        ).logits
    hook.remove()
    ac, bc, ad = seen
    # a different first image moves the span between the images, and nothing from the second image on
    assert (bc[first:second] - ac[first:second]).abs().amax(-1).min() > 0  # every position between them
    torch.testing.assert_close(bc[:first], ac[:first], rtol=0, atol=0)
    torch.testing.assert_close(bc[second:], ac[second:], rtol=0, atol=0)
    # a different second image moves only what follows it
    torch.testing.assert_close(ad[:second], ac[:second], rtol=0, atol=0)
    assert (ad[second:] - ac[second:]).abs().amax(-1).min() > 0
    # the whole model, which mixes positions through self-attention, matches the reference on each image pair
    torch.testing.assert_close(logits["bc"], swapped[0], rtol=0, atol=1e-4)
    assert (logits["ad"][second:] - logits["ac"][second:]).abs().max() > 1e-3


def test_end_of_document_ends_an_images_reach(pair) -> None:
    ours, reference, processor, _ = pair
    photo = _photos()[0]
    theirs = processor(text=["User:", photo, "Hi.</s>Next document, no image."], return_tensors="pt")
    batch = ours.processor("User:<image>Hi.</s>Next document, no image.", [photo])
    assert batch["input_ids"].tolist() == theirs["input_ids"].tolist()
    media = ours.model.prepare(batch["input_ids"], batch["pixel_values"])[1]
    assert torch.equal(media.mask.any(-1), theirs["image_attention_mask"].bool().any(-1))
    assert not media.mask[0, -1].any()
    with torch.no_grad():
        expected = reference(**theirs).logits
        got = ours.model(batch["input_ids"], batch["pixel_values"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_greedy_generation_matches_one_by_one_and_batched(pair) -> None:
    ours, reference, processor, _ = pair
    photos = _photos()
    prompts = [
        (FEW_SHOT, photos[:3], FEW_SHOT_ITEMS),
        ("<image>Describe it:", [photos[3]], [0, "Describe it:"]),
    ]
    with torch.no_grad():
        expected = []
        for _, pics, items in prompts:
            theirs = processor(text=_items(items, pics), return_tensors="pt")
            out = reference.generate(**theirs, max_new_tokens=20, do_sample=False)
            expected.append(out[0, theirs["input_ids"].shape[1] :].tolist())
            assert ours.generate_tokens(_prompt(items), pics, max_new_tokens=20) == _until_end(expected[-1])
        theirs = processor(text=[_items(items, pics) for _, pics, items in prompts], return_tensors="pt")
        out = reference.generate(**theirs, max_new_tokens=20, do_sample=False)
    texts = processor.batch_decode(out[:, theirs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert (
        ours.generate([p for p, _, _ in prompts], [pics for _, pics, _ in prompts], max_new_tokens=20)
        == texts
    )


def _prompt(items: list) -> str:
    return "".join("<image>" if isinstance(i, int) else i for i in items)


def _until_end(ids: list[int]) -> list[int]:
    return ids[: ids.index(2)] if 2 in ids else ids  # eos id 2 ends the sequence (excluded)


def test_text_only_prompt_matches(pair) -> None:
    ours, reference, processor, _ = pair
    theirs = processor(text=["A prompt without images."], return_tensors="pt")
    batch = ours.processor("A prompt without images.")
    assert batch["input_ids"].tolist() == theirs["input_ids"].tolist()
    with torch.no_grad():
        expected = reference(**theirs).logits
        got = ours.model(batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_save_pretrained_round_trip(pair, tmp_path) -> None:
    ours, reference, processor, _ = pair
    ours.save_pretrained(tmp_path)
    again = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path).eval()
    assert again.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_size"] == 32


def test_bad_config_and_tokenizer(tmp_path) -> None:
    folder = tmp_path / "idefics"
    write_tiny_idefics(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "cross_layer_interval": 3}))
    with pytest.raises(
        InputError, match=r"config.json: cross_layer_interval: got 3; expected a positive divisor"
    ):
        mmlm.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<image>"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(InputError, match=r"tokenizer.json: no <image> token, which Idefics prompts need"):
        mmlm.load(folder)


def test_budget_counts_one_slot_and_the_media_per_image(pair, capsys) -> None:
    ours, _, _, folder = pair
    assert main(["budget", "--model", str(folder), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)["styles"][0]
    c = ours.config.connector
    # the resampler's latents, or without it every tower token (16 patches + the class token)
    assert (own["kind"], own["visual_tokens"], own["media_tokens"]) == (
        "cross_attention",
        1,
        c.num_queries if c.resampler else 17,
    )
