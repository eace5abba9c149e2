"""`mmlm.load` of a transformers Chameleon folder at parity with ChameleonProcessor and generate: prompt ids and
pixels, 20 greedy tokens alone and batched with left padding, and `save_pretrained` back to a folder transformers
reads, on two tiny random configurations."""

import json

import pytest
import torch
import transformers
from fixtures_chameleon import write_tiny_chameleon
from PIL import Image
from skimage import data

import mmlm
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.inference.generation import GenerationSettings, generate_ids

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "camera": data.camera}


def _photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(PHOTOS[name]())
    return image if size is None else image.resize(size)


def _chat(text: str, images: int) -> list[dict]:
    return [{"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=["A", "B"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"chameleon-{request.param}")
    ref, ref_processor = write_tiny_chameleon(folder, request.param, tokenizer=True)
    return ref, ref_processor, mmlm.load(folder), folder


def _reference_inputs(ref_processor, prompts, images):
    texts = [p if isinstance(p, str) else ref_processor.apply_chat_template(p, add_generation_prompt=True)
             for p in prompts]  # fmt: skip
    flat = [image for group in images for image in group]
    return ref_processor(
        text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt"
    )


def test_processor_matches_chameleon_processor(pair):
    _, ref_processor, ours, _ = pair
    cases = [
        ("t9 t10 <image> t11", [_photo("astronaut")]),
        (_chat("t40 t41", 2), [_photo("chelsea", (97, 40)), _photo("camera", (30, 71))]),
        ("t5 t6 t7", []),
    ]
    for prompt, images in cases:
        want = _reference_inputs(ref_processor, [prompt], [images])
        got = ours.processor([prompt], [images])
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
        if images:
            assert torch.equal(got["pixel_values"], want["pixel_values"])
    # a left-padded batch of two prompts
    prompts, images = (
        [_chat("t33", 1), "t20 <image> t21 t22 <image>"],
        [[_photo("coffee")], [_photo("astronaut"), _photo("chelsea")]],
    )
    want = _reference_inputs(ref_processor, prompts, images)
    got = ours.processor(prompts, images)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])


def _reference_tokens(ref, ref_processor, prompts, images, eos=None) -> list[list[int]]:
    inputs = _reference_inputs(ref_processor, prompts, images)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=2)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def _our_tokens(ours, prompts, images) -> list[list[int]]:
    step, kv, settings, embeds, mask = ours.prepare(prompts, images, GenerationSettings(20), "dynamic")
    rows = [[] for _ in prompts]
    for taken in generate_ids(step, kv, settings, [], None, embeds, mask):
        for row, token in taken:
            rows[row].append(token)
    return rows


def test_greedy_generation_matches_transformers(pair):
    ref, ref_processor, ours, _ = pair
    prompts = [_chat("t7 t3 t12", 1), "t40 <image> t41 t42 <image> t43 t44"]
    images = [[_photo("chelsea")], [_photo("astronaut"), _photo("coffee", (50, 90))]]
    for prompt, group in zip(prompts, images, strict=True):  # one by one
        assert _our_tokens(ours, [prompt], [group]) == _reference_tokens(
            ref, ref_processor, [prompt], [group]
        )
    assert _our_tokens(ours, prompts, images) == _reference_tokens(ref, ref_processor, prompts, images)
    # generate's text stops at the end token, as transformers' generate does
    want = _reference_tokens(ref, ref_processor, prompts[:1], images[:1], eos=ours.eos_token_ids)[0]
    want = want[: want.index(1)] if 1 in want else want
    assert ours.generate(prompts[0], images[0], max_new_tokens=20) == ours.decode(want)


def test_save_pretrained_round_trips_through_transformers(pair, tmp_path):
    ref, ref_processor, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path).eval()
    back_processor = transformers.ChameleonProcessor.from_pretrained(tmp_path)
    # ChameleonProcessor.from_pretrained leaves chat_template.jinja unread (transformers 5.25, its own saves too)
    assert (tmp_path / "chat_template.jinja").read_text() == ref_processor.chat_template
    prompts, images = ["t9 <image> t10"], [[_photo("camera")]]
    inputs = _reference_inputs(ref_processor, prompts, images)
    assert torch.equal(_reference_inputs(back_processor, prompts, images)["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, ref(**inputs).logits)
    assert _our_tokens(mmlm.load(tmp_path), prompts, images) == _our_tokens(ours, prompts, images)


def test_image_seq_length_must_match_the_vq_grid(pair, tmp_path):
    _, _, ours, folder = pair
    for name in folder.iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    settings = json.loads((folder / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**settings, "image_seq_length": 5}))
    n = ours.config.image_tokens
    with pytest.raises(
        InputError,
        match=rf"^{tmp_path}/processor_config.json: image_seq_length 5, but the VQ-GAN makes {n} codes per image$",
    ):
        mmlm.load(tmp_path)


def test_mmlm_chat_answers_with_the_models_greedy_text(pair, tmp_path, capsys):
    _, _, ours, folder = pair
    _photo("coffee").save(tmp_path / "coffee.png")
    argv = [
        "chat",
        "--model",
        str(folder),
        "--image",
        str(tmp_path / "coffee.png"),
        "--max-new-tokens",
        "8",
        "t4 t5",
    ]
    assert main(argv) == 0
    want = ours.generate(_chat("t4 t5", 1), [_photo("coffee")], max_new_tokens=8)
    assert want and capsys.readouterr().out.strip() == want
