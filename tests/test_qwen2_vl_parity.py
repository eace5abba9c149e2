"""mmlm.load on transformers Qwen2-VL and Qwen2.5-VL folders: the processor's ids, patches and grids identical to
transformers' processor, logits within 1e-4, greedy generations token-identical to transformers' generate (one by
one and batched with left padding), the export round trip, and bad inputs with their one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from fixtures_qwen2_vl import reference_processor, write_tiny_qwen2_vl
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mmlm
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.inference.qwen2_vl import Qwen2VLGenerativeModel, image_grid_thw
from mmlm.models.qwen2_vl_vision import window_order
from mmlm.processing.qwen2_vl_image import Qwen2VLResize

CONFIGS = {
    # Qwen2-VL: LayerNorm + quick-GELU tower; images resized to 4..20 merged tokens of 28 px
    "qwen2_vl": dict(model_type="qwen2_vl"),
    # Qwen2.5-VL: RMSNorm + SwiGLU tower, block 0 in 56-px windows (2×2 merged tokens), block 1 whole-image;
    # tied embeddings
    "qwen2_5_vl-windows-tied": dict(model_type="qwen2_5_vl", window_size=56, tie_word_embeddings=True),
}
EOS = 2
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def photos() -> list[Image.Image]:
    """Three photographs of different sizes and aspect ratios (one grayscale)."""
    return [
        Image.fromarray(data.chelsea()),  # 300×451
        Image.fromarray(data.camera()[:, :200]),  # 512×200, grayscale
        Image.fromarray(data.astronaut()[:100]),  # 100×512
    ]


def chat(text: str, images: int) -> str:
    """A Qwen chat prompt as its template writes it, with `images` image placeholders before the text."""
    return f"<|im_start|>user\n{IMAGE * images}{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    options = dict(CONFIGS[request.param])
    ref = write_tiny_qwen2_vl(folder, **options)
    return ref, mmlm.load(folder), reference_processor(folder, options["model_type"]), folder


def reference_inputs(m, batch) -> dict[str, torch.Tensor]:
    """Our batch as transformers' Qwen2-VL models take it."""
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], image_grid_thw=image_grid_thw(batch["image_grid"]),
                mm_token_type_ids=(batch["input_ids"] == m.config.image_token_id).int())  # fmt: skip


def test_loads_as_a_generative_model(pair):
    ref, m, _, _ = pair
    assert isinstance(m, Qwen2VLGenerativeModel)
    assert m.config.image_token_id == ref.config.image_token_id
    assert m.config.lm.mrope_section == [2, 3, 3]
    assert m.config.lm.tie_word_embeddings == ref.config.tie_word_embeddings


def test_processor_matches_transformers(pair):
    _, m, theirs, _ = pair
    prompts = [chat("What is this? And this?", 2), chat("One more", 1)]
    images = [photos()[:2], photos()[2:]]
    ref = theirs(
        text=prompts, images=images[0] + images[1], padding=True, padding_side="left", return_tensors="pt"
    )
    ours = m.processor(prompts, images, padding_side="left")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert torch.equal(image_grid_thw(ours["image_grid"]), ref["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=0, rtol=0)
    # 300×451, 512×200 and 100×512 px at 4..20 blocks of 28 px: 6×10, 14×4 and 2×20 patches of 14 px
    assert ours["image_grid"].tolist() == [[6, 10], [14, 4], [2, 20]]
    assert int((ours["input_ids"][1] == m.config.image_token_id).sum()) == 2 * 20 // 4


def test_patch_embedding_is_transformers_conv3d(pair):
    ref, m, theirs, _ = pair
    pixels = theirs.image_processor(photos()[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(m.model.vision.patch_embed(pixels), ref.model.visual.patch_embed(pixels),
                                   atol=1e-4, rtol=1e-5)  # fp32 sums in another order  # fmt: skip


def test_logits_match_transformers(pair):
    ref, m, _, _ = pair
    batch = m.processor(chat("What is in the picture? And here?", 2), photos()[:2])
    grid = image_grid_thw(batch["image_grid"])
    with torch.no_grad():
        theirs = ref(**reference_inputs(m, batch)).logits
        ours = m.model(batch["input_ids"], batch["pixel_values"], grid).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    swapped = m.processor(chat("What is in the picture? And here?", 2), photos()[1::-1])
    with torch.no_grad():
        other = m.model(
            swapped["input_ids"], swapped["pixel_values"], image_grid_thw(swapped["image_grid"])
        ).logits
    assert (other[0, -1] - ours[0, -1]).abs().max() > 1e-2  # the images reach the logits
    if m.config.vision.window_size is not None:  # the windows really split each image
        _, lengths = window_order(grid, 2, m.config.vision.window_size // 2 // m.config.vision.patch_size)
        assert len(lengths) > 2 * len(grid)


def reference_generate(m, ref, batch, max_new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = ref.generate(**reference_inputs(m, batch), max_new_tokens=max_new_tokens, do_sample=False)
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in rows]  # eos ends ours; it is not returned


def test_greedy_generation_is_token_identical(pair):
    ref, m, _, _ = pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    batch = m.processor(messages, [photos()[0]])
    theirs = reference_generate(m, ref, batch, 20)[0]
    assert len(theirs) == 20  # no early end: all 20 decoded positions are compared
    assert m.generate_tokens(messages, [photos()[0]], max_new_tokens=20) == theirs
    text = m.generate(messages, [photos()[0]], max_new_tokens=20)
    assert text == m.decode(theirs)
    assert "".join(m.stream(messages, [photos()[0]], max_new_tokens=20)) == text


def test_batched_left_padded_generation_matches_transformers(pair):
    ref, m, _, _ = pair
    prompts = [chat("Hi", 1), chat("A much longer question about these two pictures", 2)]
    images = [[photos()[1]], [photos()[0], photos()[2]]]
    batch = m.processor(prompts, images, padding_side="left")
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the first prompt is left-padded
    theirs = reference_generate(m, ref, batch, 20)
    together = m.generate(prompts, images, max_new_tokens=20)
    alone = [m.generate(p, i, max_new_tokens=20) for p, i in zip(prompts, images, strict=True)]
    assert together == alone == [m.decode(t) for t in theirs]


def test_text_only_prompt_matches_transformers(pair):
    ref, m, _, _ = pair
    prompt = chat("No picture here", 0)
    ids = m.processor(prompt)["input_ids"]
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    theirs = out[0, ids.shape[1] :].tolist()
    assert m.generate_tokens(prompt, max_new_tokens=8) == (
        theirs[: theirs.index(EOS)] if EOS in theirs else theirs
    )


def test_export_round_trip_loads_in_transformers_and_mmlm(pair, tmp_path):
    ref, m, _, _ = pair
    m.save_pretrained(tmp_path)
    again = type(ref).from_pretrained(tmp_path).eval()
    batch = m.processor(chat("Hi", 1), [photos()[1]])
    with torch.no_grad():
        a = again(**reference_inputs(m, batch)).logits
        b = ref(**reference_inputs(m, batch)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    reloaded = mmlm.load(tmp_path)
    assert (
        reloaded.processor(chat("Hi", 1), [photos()[1]])["input_ids"].tolist() == batch["input_ids"].tolist()
    )
    assert reloaded.generate(chat("Hi", 1), [photos()[1]], max_new_tokens=6) == m.generate(
        chat("Hi", 1), [photos()[1]], max_new_tokens=6
    )


def test_bad_inputs(pair, monkeypatch):
    _, m, _, _ = pair
    with pytest.raises(
        InputError, match=r"^images: got 2 image\(s\) for 1 <\|image_pad\|> placeholder\(s\)$"
    ):
        m.generate(chat("Hi", 1), photos()[:2])
    sliver = Image.fromarray(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(InputError) as error:
        m.generate(chat("Hi", 1), [sliver])
    assert str(error.value) == "image: 2x500 has an aspect ratio of 250.0; Qwen2-VL takes at most 200"
    # a pixel range too narrow to hold a 60×80 image's rounding: 28×56 px, under min_pixels
    monkeypatch.setattr(m.processor, "dynamic_resolution", Qwen2VLResize(56 * 56, 56 * 56))
    with pytest.raises(InputError) as error:
        m.processor(chat("Hi", 1), [Image.fromarray(np.zeros((60, 80, 3), np.uint8))])
    assert str(error.value) == (
        "image: 60x80 resizes to 28x56, below min_pixels=3136; expected max_pixels well above min_pixels (got 3136)"
    )
    with pytest.raises(InputError, match=r"^format: Qwen2-VL saves as a transformers folder only"):
        m.save_pretrained("unused", format="mmlm")


def test_reference_smart_resize_agrees():
    """Our resize picks transformers' sizes over many sizes and ranges (its function is the reference)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for height, width in [(1, 150), (30, 30), (300, 451), (512, 200), (1000, 7), (4000, 3000)]:
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 20 * 28 * 28)]:
            ours = Qwen2VLResize(lo, hi).resized_size(height, width)
            assert ours == smart_resize(height, width, 28, lo, hi)


def test_budget_counts_the_tokens_and_tower_flops_of_an_image_resolution(pair, capsys):
    _, m, _, folder = pair
    for photo in photos():
        argv = ["budget", "--model", str(folder), "--resolution", f"{photo.height}x{photo.width}", "--json"]
        assert main(argv) == 0
        planned = json.loads(capsys.readouterr().out)
        batch = m.processor(IMAGE, [photo])
        assert planned["styles"][0]["visual_tokens"] == int(
            (batch["input_ids"] == m.config.image_token_id).sum()
        )
        if (
            m.config.vision.window_size is None
        ):  # FlopCounterMode counts the full T² pairs a masked SDPA computes
            # on CPU it sees attention through the math backend only (as tests/test_budget.py)
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                m.model.vision(batch["pixel_values"], image_grid_thw(batch["image_grid"]))
            assert planned["vision_flops"] == counter.get_total_flops()
    assert main(["budget", "--model", str(folder)]) != 0
    error = (
        "mmlm: error: --resolution: Qwen2-VL reads each image at its own size; give HEIGHTxWIDTH in pixels\n"
    )
    assert capsys.readouterr().err == error


def test_hub_layout_of_transformers_4_loads_the_same(pair, tmp_path):
    """The hub's files: tensors under visual.* and model.*, text settings at the top level, rope_scaling
    {"type": "mrope"}, min_pixels / max_pixels in preprocessor_config.json."""
    ref, m, _, folder = pair
    weights = load_file(folder / "model.safetensors")
    renamed = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
               for k, v in weights.items()}  # fmt: skip
    save_file(renamed, tmp_path / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    text["rope_theta"] = rope["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps({**config, **text, "model_type": config["model_type"]}))
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    size = settings.pop("size")
    settings.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    old = mmlm.load(tmp_path)
    batch = m.processor(chat("Hi", 2), photos()[1:])
    assert old.processor(chat("Hi", 2), photos()[1:])["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        theirs = ref(**reference_inputs(m, batch)).logits
        ours = old.model(
            batch["input_ids"], batch["pixel_values"], image_grid_thw(batch["image_grid"])
        ).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_chat_command_answers_about_an_image(pair, tmp_path, capsys):
    _, m, _, folder = pair
    photos()[2].save(tmp_path / "astronaut.png")
    argv = ["chat", "--model", str(folder), "--image", str(tmp_path / "astronaut.png"), "What is it?",
            "--max-new-tokens", "6"]  # fmt: skip
    assert main(argv) == 0
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert capsys.readouterr().out == m.generate(messages, [photos()[2]], max_new_tokens=6) + "\n"
