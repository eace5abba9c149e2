"""Chameleon at parity with transformers: the VQ-GAN's codes, the image processor, the code -> token map,
logits, and greedy generation, on two tiny random configurations."""

import json

import pytest
import torch
from fixtures_chameleon import BOI, EOI, IMAGE, TEXT_TOKENS, write_tiny_chameleon
from PIL import Image
from skimage import data

from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_chameleon import chameleon_config_from_hf, chameleon_key_map
from mmlm.checkpoints.keymap import to_theirs
from mmlm.checkpoints.processor_files import image_processor_settings
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.generation import GenerationSettings, generate_ids
from mmlm.models.chameleon import ChameleonModel
from mmlm.processing.image import ImageProcessor

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "camera": data.camera}


def _photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(PHOTOS[name]())
    return image if size is None else image.resize(size)


@pytest.fixture(scope="module", params=["A", "B"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"chameleon-{request.param}")
    ref, ref_processor = write_tiny_chameleon(folder, request.param)
    cfg = chameleon_config_from_hf(json.loads((folder / "config.json").read_text()))
    weights = read_weights(folder)
    ours = build_from_weights(lambda: ChameleonModel(cfg), weights, chameleon_key_map(cfg), str(folder))
    processor = ImageProcessor.from_hf(image_processor_settings(folder))
    return ref, ref_processor, ours, processor, weights


def _prompt(ref, images: int, text: list[int]) -> list[int]:
    vocab = ref.config.vocabulary_map
    per_image = ref.model.vqmodel.config.resolution // 2 ** (
        len(ref.model.vqmodel.config.channel_multiplier) - 1
    )
    one = [vocab[BOI], *[vocab[IMAGE]] * per_image**2, vocab[EOI]]
    return [0, *one * images, *text]


def test_image_processor_matches_transformers(pair):
    ref, ref_processor, _, processor, _ = pair
    images = [_photo("astronaut"), _photo("coffee"), _photo("chelsea", (97, 40)), _photo("camera", (30, 71))]
    want = ref_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(images), want)


def test_image_codes_match_transformers(pair):
    ref, ref_processor, ours, _, _ = pair
    pixels = ref_processor([_photo(n) for n in PHOTOS], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = ref.get_image_tokens(pixels)
        got = ours.image_token_ids(pixels)
    assert torch.equal(got, want.long())
    assert got.unique().numel() > 10  # a random VQ-GAN that maps everything to one code would prove nothing
    assert set(got.flatten().tolist()) <= set(ours.cfg.code_token_ids)


def test_key_map_round_trips(pair):
    _, _, ours, _, weights = pair
    back = to_theirs(ours.state_dict(), chameleon_key_map(ours.cfg))
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_logits_match_transformers(pair):
    ref, ref_processor, ours, _, _ = pair
    pixels = ref_processor([_photo("astronaut"), _photo("coffee")], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([_prompt(ref, 2, [5, 17, 33, 8, 91])])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels).logits
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(got == torch.finfo(got.dtype).min, want == torch.finfo(want.dtype).min)


def _greedy(ours, ids, mask, pixels, steps):
    spliced = ours.splice(ids, pixels)

    def step(input_ids, inputs_embeds, attention_mask, cache):
        return ours.suppress_image_tokens(ours.lm(input_ids, inputs_embeds, attention_mask, cache=cache,
                                                  last_only=True).logits)[:, -1]  # fmt: skip

    rows = [[] for _ in range(ids.shape[0])]
    settings = GenerationSettings(max_new_tokens=steps)
    for taken in generate_ids(step, ours.new_cache(ids.shape[0]), settings, [], spliced, None, mask):
        for row, token in taken:
            rows[row].append(token)
    return rows


def test_greedy_generation_matches_transformers(pair):
    ref, ref_processor, ours, _, _ = pair
    photos = [_photo("chelsea"), _photo("astronaut"), _photo("coffee")]
    pixels = ref_processor(photos, return_tensors="pt")["pixel_values"]
    prompts = [_prompt(ref, 1, [7, 3, 12]), _prompt(ref, 2, [40, 41, 42, 43, 44, 45])]
    longest = max(map(len, prompts))
    ids = torch.tensor([[2] * (longest - len(p)) + p for p in prompts])  # left padding with pad id 2
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()
    # one by one
    for i, (prompt, images) in enumerate(zip(prompts, (pixels[:1], pixels[1:]), strict=True)):
        one = torch.tensor([prompt])
        with torch.no_grad():
            want = ref.generate(input_ids=one, pixel_values=images, max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=2)[0, one.shape[1]:].tolist()  # fmt: skip
        assert _greedy(ours, one, None, images, 20)[0] == want, f"prompt {i}"
        assert all(t < TEXT_TOKENS + 4 or t >= TEXT_TOKENS + 4 + ours.cfg.vq.num_embeddings for t in want)
    # batched, left-padded
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=20,
                            do_sample=False, eos_token_id=None, pad_token_id=2)[:, longest:].tolist()  # fmt: skip
    assert _greedy(ours, ids, mask, pixels, 20) == want


def test_vocabulary_without_every_code_is_refused(pair):
    ref = pair[0]
    hf = ref.config.to_dict()
    hf["vocabulary_map"] = {k: v for k, v in hf["vocabulary_map"].items() if k != "IMGIMGBZ"}
    with pytest.raises(
        InputError, match=r"^vocabulary_map: no IMGIMG token for VQ code 1 \(1 of \d+ missing\)$"
    ):
        chameleon_config_from_hf(hf)


def test_placeholder_count_must_match_the_images(pair):
    ref, ref_processor, ours, _, _ = pair
    pixels = ref_processor([_photo("coffee")], return_tensors="pt")["pixel_values"]
    prompt = _prompt(ref, 1, [5])
    prompt.remove(ours.cfg.image_token_id)  # one placeholder short
    n = ours.cfg.image_tokens
    with pytest.raises(
        InputError, match=rf"^input_ids: {n - 1} <image> placeholders for 1 images of {n} tokens each$"
    ):
        ours(torch.tensor([prompt]), pixels)
