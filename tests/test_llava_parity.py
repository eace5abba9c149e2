"""mmlm.load on transformers LLaVA folders: logits within 1e-4 and greedy generations token-identical to
transformers' generate, over tower (CLIP, SigLIP), feature layer, feature selection, GQA and tied embeddings."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.errors import InputError
from mmlm.inference.vlm import GenerativeModel

CONFIGS = {
    "clip-penultimate-default": dict(tower="clip", feature_layer=-2, select="default"),
    "clip-last-full-mha-tied": dict(tower="clip", feature_layer=-1, select="full", num_key_value_heads=4,
                                    tie_word_embeddings=True),
    "siglip-penultimate-full": dict(tower="siglip", feature_layer=-2, select="full"),
    "clip-two-layers": dict(tower="clip", feature_layer=[-3, -1], select="default"),
}  # fmt: skip


def photos():
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_tiny_llava(folder, **CONFIGS[request.param])
    return ref, mmlm.load(folder), folder


def test_loads_as_a_generative_model(pair):
    ref, m, _ = pair
    assert isinstance(m, GenerativeModel)
    # a 4×4 patch grid, plus CLIP's class token, minus the first token under "default" selection
    has_class = ref.config.vision_config.model_type == "clip_vision_model"
    expected = 16 + has_class - (ref.config.vision_feature_select_strategy == "default")
    assert m.model.image_tokens == m.processor.tokens_per_tile == expected


def test_logits_match_transformers(pair):
    ref, m, _ = pair
    prompt = "USER: <image>\nWhat is in the picture? And here: <image>\nASSISTANT:"
    batch = m.processor(prompt, photos())
    with torch.no_grad():
        theirs = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        ours = m.model(batch["input_ids"], batch["pixel_values"]).logits
    assert int((batch["input_ids"] == m.config.image_token_id).sum()) == 2 * m.model.image_tokens
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_generation_is_token_identical(pair):
    ref, m, _ = pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    batch = m.processor(messages, [photos()[0]])
    with torch.no_grad():
        out = ref.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], max_new_tokens=12, do_sample=False)  # fmt: skip
    theirs = out[0, batch["input_ids"].shape[1] :].tolist()
    theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs  # eos ends ours; it is not returned
    assert m.generate_tokens(messages, [photos()[0]], max_new_tokens=12) == theirs
    text = m.generate(messages, [photos()[0]], max_new_tokens=12)
    assert text == m.decode(theirs)
    assert "".join(m.stream(messages, [photos()[0]], max_new_tokens=12)) == text


def test_batched_left_padded_generation_equals_one_by_one(pair):
    _, m, _ = pair
    prompts = ["USER: <image>\nHi ASSISTANT:", "USER: <image>\nA much longer question about it ASSISTANT:"]
    images = [[photos()[0]], [photos()[1]]]
    together = m.generate(prompts, images, max_new_tokens=8)
    alone = [m.generate(p, i, max_new_tokens=8) for p, i in zip(prompts, images, strict=True)]
    assert together == alone


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    ref, m, _ = pair
    m.save_pretrained(tmp_path)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = m.processor("USER: <image>\nHi ASSISTANT:", [photos()[1]])
    with torch.no_grad():
        a = again(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        b = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    reloaded = mmlm.load(tmp_path)
    assert reloaded.generate("USER: <image>\nHi ASSISTANT:", [photos()[1]], max_new_tokens=6) == m.generate(
        "USER: <image>\nHi ASSISTANT:", [photos()[1]], max_new_tokens=6
    )


def test_bad_inputs(pair):
    _, m, _ = pair
    with pytest.raises(InputError, match="placeholder"):
        m.generate("USER: <image>\n<image>\nHi ASSISTANT:", [photos()[0]])
    with pytest.raises(InputError, match="placeholder"):
        m.generate("USER: Hi ASSISTANT:", [photos()[0]])
    with pytest.raises(InputError, match="max_new_tokens"):
        m.generate("USER: <image>\nHi ASSISTANT:", [photos()[0]], max_new_tokens=0)
    with pytest.raises(InputError):
        m.generate("USER: <image>\nHi ASSISTANT:", [Image.fromarray(np.zeros((0, 5, 3), np.uint8))])
    with pytest.raises(InputError, match="context"):
        m.generate("USER: <image>\n" + "word " * 200 + "ASSISTANT:", [photos()[0]])


def test_one_bare_image_and_one_stop_string(pair, tmp_path):
    _, m, _ = pair
    path = tmp_path / "photo.png"
    photos()[0].save(path)
    prompt = "USER: <image>\nHi ASSISTANT:"
    full = m.generate(prompt, [path], max_new_tokens=8)
    assert m.generate(prompt, str(path), max_new_tokens=8) == full
    if len(full) > 2:  # a stop string given bare is one string, not its characters
        assert m.generate(prompt, [path], max_new_tokens=8, stop=full[1:3]) == full[: full.index(full[1:3])]
