"""mmlm.load on transformers Idefics3 and SmolVLM folders: the processor's ids and pixels identical to
transformers' processors, logits within 1e-4, greedy generations token-identical to transformers' generate (one
by one and batched with left padding), over splitting on/off, scale factors 2, 4 and 5, and tied embeddings."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings
from transformers.models.smolvlm import processing_smolvlm

import mmlm
from fixtures_idefics3 import write_tiny_idefics3
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.inference.vlm import GenerativeModel
from mmlm.models.vision import bucket_position_ids
from mmlm.processing.idefics3_image import Idefics3Splitting, pad_views

CONFIGS = {
    # 32-px tiles of 8×8 patches, r=2: 16 tokens per tile; images resized to 96 px split into up to 3×3 tiles
    "idefics3-split-r2": dict(model_type="idefics3", scale_factor=2, longest_edge=96),
    # 50-px views of 25×25 patches (a side where Idefics3's bucketed positions are not the identity), r=5
    "smolvlm-unsplit-r5-tied": dict(model_type="smolvlm", scale_factor=5, image_size=50, patch_size=2,
                                    splitting=False, tie_word_embeddings=True),
    "smolvlm-split-r4-mha": dict(model_type="smolvlm", scale_factor=4, longest_edge=80, num_key_value_heads=4),
}  # fmt: skip
EOS = 2


def photos() -> list[Image.Image]:
    """Three photographs of different sizes and aspect ratios (one grayscale)."""
    return [
        Image.fromarray(data.chelsea()),  # 300×451
        Image.fromarray(data.camera()[:, :200]),  # 512×200, grayscale
        Image.fromarray(data.astronaut()[:100]),  # 100×512
    ]


def reference_processor(folder, ref, tokens_per_tile: int):
    """transformers' own processor for the folder; SmolVLM's without its video processor (needs torchvision)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if ref.config.model_type == "idefics3":
        image_processor = transformers.Idefics3ImageProcessorPil.from_pretrained(folder)
        return transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=tokens_per_tile)
    image_processor = transformers.SmolVLMImageProcessorPil.from_pretrained(folder)
    with pytest.MonkeyPatch.context() as patch:  # the video parts (num2words, torchvision) are not under test
        patch.setattr(processing_smolvlm, "num2words", str)
        patch.setattr(processing_smolvlm.SmolVLMProcessor, "check_argument_for_proper_class", lambda *a: None)
        return processing_smolvlm.SmolVLMProcessor(
            image_processor, tokenizer, None, image_seq_len=tokens_per_tile
        )


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_tiny_idefics3(folder, max_position_embeddings=1024, **CONFIGS[request.param])
    m = mmlm.load(folder)
    return ref, m, reference_processor(folder, ref, m.processor.tokens_per_tile), folder


def views_per_prompt(batch) -> list[int]:
    tiles = batch["image_tiles"].split(batch["images_per_sample"].tolist())
    return [int(t.sum()) for t in tiles]


def reference_inputs(batch) -> dict[str, torch.Tensor]:
    """Our batch in the layout transformers' Idefics3 models take (views padded per prompt)."""
    pixels, mask = pad_views(batch["pixel_values"], views_per_prompt(batch))
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                pixel_attention_mask=mask)  # fmt: skip


def test_loads_as_a_generative_model(pair):
    ref, m, theirs, _ = pair
    assert isinstance(m, GenerativeModel)
    v, r = ref.config.vision_config, ref.config.scale_factor
    assert m.model.image_tokens == m.processor.tokens_per_tile == (v.image_size // v.patch_size) ** 2 // r**2
    assert m.config.image_token_id == ref.config.image_token_id


def test_processor_matches_transformers(pair):
    _, m, theirs, _ = pair
    prompts = ["User:<image>What is this? And <image> this?<end_of_utterance>\nAssistant:",
               "User: one more <image><end_of_utterance>\nAssistant:"]  # fmt: skip
    images = [photos()[:2], photos()[2:]]
    ref = theirs(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt")
    ours = m.processor(prompts, images, padding_side="left")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    pixels, mask = pad_views(ours["pixel_values"], views_per_prompt(ours))
    assert pixels.shape == ref["pixel_values"].shape
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=0, rtol=0)
    assert torch.equal(mask, ref["pixel_attention_mask"])
    # 300×451, 512×200 and 100×512 resized to a longest edge of 96 (80) px, then up to 32-px multiples
    split = m.processor.dynamic_resolution.do_image_splitting
    assert ours["image_grid"].tolist() == ([[2, 3], [3, 2], [1, 3]] if split else [[0, 0]] * 3)


def test_logits_match_transformers(pair):
    ref, m, _, _ = pair
    prompt = "User:<image>What is in the picture? And here:<image><end_of_utterance>\nAssistant:"
    batch = m.processor(prompt, photos()[:2])
    with torch.no_grad():
        theirs = ref(**reference_inputs(batch)).logits
        ours = m.model(batch["input_ids"], batch["pixel_values"]).logits
        other = m.model(
            batch["input_ids"], batch["pixel_values"].flip(0)
        ).logits  # the views in another order
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (other[0, -1] - ours[0, -1]).abs().max() > 1e-2  # the images reach the logits


def reference_generate(ref, batch, max_new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = ref.generate(**reference_inputs(batch), max_new_tokens=max_new_tokens, do_sample=False)
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in rows]  # eos ends ours; it is not returned


def test_greedy_generation_is_token_identical(pair):
    ref, m, _, _ = pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    batch = m.processor(messages, [photos()[0]])
    theirs = reference_generate(ref, batch, 20)[0]
    assert m.generate_tokens(messages, [photos()[0]], max_new_tokens=20) == theirs
    text = m.generate(messages, [photos()[0]], max_new_tokens=20)
    assert text == m.decode(theirs)
    assert "".join(m.stream(messages, [photos()[0]], max_new_tokens=20)) == text


def test_batched_left_padded_generation_matches_transformers(pair):
    ref, m, _, _ = pair
    prompts = ["User:<image>Hi<end_of_utterance>\nAssistant:",
               "User:<image>A much longer question about <image> these two<end_of_utterance>\nAssistant:"]  # fmt: skip
    images = [[photos()[1]], [photos()[0], photos()[2]]]
    batch = m.processor(prompts, images, padding_side="left")
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the first prompt is left-padded
    theirs = reference_generate(ref, batch, 20)
    together = m.generate(prompts, images, max_new_tokens=20)
    alone = [m.generate(p, i, max_new_tokens=20) for p, i in zip(prompts, images, strict=True)]
    assert together == alone == [m.decode(t) for t in theirs]


def test_export_round_trip_loads_in_transformers_and_mmlm(pair, tmp_path):
    ref, m, _, _ = pair
    m.save_pretrained(tmp_path)
    again = type(ref).from_pretrained(tmp_path).eval()
    prompt = "User:<image>Hi<end_of_utterance>\nAssistant:"
    batch = m.processor(prompt, [photos()[1]])
    with torch.no_grad():
        a = again(**reference_inputs(batch)).logits
        b = ref(**reference_inputs(batch)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    exported = reference_processor(tmp_path, again, m.processor.tokens_per_tile)
    theirs = exported(text=[prompt], images=[[photos()[1]]], return_tensors="pt")
    assert theirs["input_ids"].tolist() == batch["input_ids"].tolist()
    expected = m.generate(prompt, [photos()[1]], max_new_tokens=6)
    for folder in (tmp_path, m.save_pretrained(tmp_path / "mmlm", format="mmlm")):  # and mmlm's own format
        reloaded = mmlm.load(folder)
        assert reloaded.processor(prompt, [photos()[1]])["input_ids"].tolist() == batch["input_ids"].tolist()
        assert reloaded.generate(prompt, [photos()[1]], max_new_tokens=6) == expected


def test_bad_inputs(pair, monkeypatch):
    _, m, _, _ = pair
    with pytest.raises(InputError, match=r"^images: got 2 image\(s\) for 1 <image> placeholder\(s\)$"):
        m.generate("User:<image>Hi<end_of_utterance>\nAssistant:", photos()[:2])
    with pytest.raises(InputError, match="placeholder"):
        m.generate("User: Hi<end_of_utterance>\nAssistant:", [photos()[0]])
    with pytest.raises(InputError, match="expected a non-zero width and height"):
        m.generate("User:<image>Hi", [Image.fromarray(np.zeros((0, 5, 3), np.uint8))])
    # 8×8 tiles need <row_7_col_1> and beyond, which the checkpoint's tokenizer does not have
    tile = m.config.vision.image_size
    monkeypatch.setattr(m.processor, "dynamic_resolution", Idefics3Splitting(tile, 8 * tile))
    with pytest.raises(
        InputError, match=r"^image: split into 8x8 tiles, but the tokenizer has no <row_1_col_7> "
    ):
        m.processor("User:<image>Hi", [Image.fromarray(data.astronaut())])


@pytest.mark.parametrize("side, grid", [(8, (8, 8)), (19, (19, 19)), (25, (25, 25)), (8, (6, 9))])
def test_bucketed_positions_match_idefics3_embeddings(side, grid):
    """At the native grid and below it, the position ids are transformers' (a 19 or 25 side is not the identity)."""
    config = transformers.Idefics3VisionConfig(hidden_size=8, image_size=side * 2, patch_size=2)
    embeddings = Idefics3VisionEmbeddings(config).eval()
    torch.nn.init.zeros_(embeddings.patch_embedding.weight)
    torch.nn.init.zeros_(embeddings.patch_embedding.bias)  # the output is then the position embeddings alone
    pixels = torch.zeros(1, 3, grid[0] * 2, grid[1] * 2)
    with torch.no_grad():
        theirs = embeddings(pixels, torch.ones(1, *grid, dtype=torch.bool))[0]
    ours = embeddings.position_embedding.weight[bucket_position_ids(side, grid)]
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_budget_counts_the_tiles_of_an_image_resolution(pair, capsys):
    _, m, _, folder = pair
    for photo in photos():
        argv = ["budget", "--model", str(folder), "--resolution", f"{photo.height}x{photo.width}", "--json"]
        assert main(argv) == 0
        planned = json.loads(capsys.readouterr().out)["styles"][0]["visual_tokens"]
        ids = m.processor("<image>", [photo])["input_ids"]
        assert planned == int((ids == m.config.image_token_id).sum())
    assert main(["budget", "--model", str(folder), "--resolution", "3 by 4"]) != 0
    error = "mmlm: error: --resolution: got '3 by 4'; expected HEIGHTxWIDTH in pixels, e.g. 480x640\n"
    assert capsys.readouterr().err == error
