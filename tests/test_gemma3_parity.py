"""mmlm.load on transformers Gemma 3 image-text folders: the processor's ids and pixels identical to transformers'
Gemma3Processor, logits within 1e-4 (sliding window crossed, bidirectional image slots), greedy generations
token-identical to transformers' generate (one by one and batched with left padding), the export round trip,
the budget's tokens per image, and bad inputs with their one-line errors."""

import json
import shutil

import pytest
import torch
import transformers
from fixtures_gemma3 import reference_processor, write_tiny_gemma3
from PIL import Image
from skimage import data

import mmlm
from fixtures_lm import write_lm_tokenizer
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.inference.gemma3 import Gemma3GenerativeModel
from mmlm.models.decoder_lm import build_attention_mask

CONFIGS = {
    # 32-px images, 8×8 patches pooled 4×4 -> 4 tokens; window 8 on layers 0, 1; linear-scaled global rotary
    "window8-mm4": dict(),
    # 16 tokens per image (pooled 2×2), tied embeddings, window 6, the global layer first, default rotary
    "tied-mm16": dict(mm_tokens_per_image=16, tie_word_embeddings=True, sliding_window=6,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
}  # fmt: skip
EOS = 2


def photos() -> list[Image.Image]:
    """Three photographs of different sizes and aspect ratios (one grayscale)."""
    return [
        Image.fromarray(data.chelsea()),  # 300×451
        Image.fromarray(data.camera()[:, :200]),  # 512×200, grayscale
        Image.fromarray(data.astronaut()[:100]),  # 100×512
    ]


def chat(text: str, images: int) -> list[dict]:
    """One user turn: `images` image parts, then the text."""
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_tiny_gemma3(folder, **CONFIGS[request.param])
    return ref, mmlm.load(folder), reference_processor(folder), folder


def reference_batch(theirs, messages: list, images: list) -> dict:
    """transformers' processor on the rendered template (no second bos), left-padded."""
    texts = [theirs.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    return theirs(text=texts, images=images, padding=True, padding_side="left", add_special_tokens=False,
                  return_tensors="pt")  # fmt: skip


def test_loads_as_a_generative_model(pair):
    ref, m, _, _ = pair
    assert isinstance(m, Gemma3GenerativeModel)
    assert m.model.image_tokens == ref.config.mm_tokens_per_image
    assert m.config.lm.tie_word_embeddings == ref.config.text_config.tie_word_embeddings
    assert m.config.lm.sliding_layers == [
        i for i, t in enumerate(ref.config.text_config.layer_types) if t == "sliding_attention"
    ]


def test_processor_matches_transformers(pair):
    _, m, theirs, _ = pair
    messages = [chat("What is this? And this?", 2), chat("One more", 1)]
    images = [photos()[:2], photos()[2:]]
    ref = reference_batch(theirs, messages, images)
    ours = m.processor(messages, images, padding_side="left")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=0, rtol=0)
    slots = (ours["input_ids"] == m.config.image_token_id).int()
    assert torch.equal(slots, ref["token_type_ids"])  # token_type_ids mark exactly the slots we fill
    assert int(slots[0].sum()) == 2 * m.model.image_tokens


def test_logits_match_transformers(pair):
    ref, m, theirs, _ = pair
    messages = [chat("What is in the picture? And here, what do you see?", 2)]
    batch = reference_batch(theirs, messages, [photos()[:2]])
    assert batch["input_ids"].shape[1] > 3 * m.config.lm.sliding_window  # the prompt crosses the window
    with torch.no_grad():
        ours = m.model(batch["input_ids"], batch["pixel_values"]).logits
        ref_logits = ref(**batch).logits
        causal = ref(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0)
    assert (causal - ref_logits).abs().max() > 1e-3  # the bidirectional image slots change the logits
    swapped = reference_batch(theirs, messages, [photos()[1::-1]])
    with torch.no_grad():
        other = m.model(swapped["input_ids"], swapped["pixel_values"]).logits
    assert (other[0, -1] - ours[0, -1]).abs().max() > 1e-2  # the images reach the logits


def test_image_slots_attend_both_ways_within_their_image_only():
    blocks = torch.tensor([[-1, 0, 0, -1, 1, 1]])  # text, image 0 (2 slots), text, image 1 (2 slots)
    mask, _ = build_attention_mask(None, 0, 6, None, torch.device("cpu"), blocks)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
    ]
    windowed, _ = build_attention_mask(None, 0, 6, 2, torch.device("cpu"), blocks)
    assert windowed[0, 0, 4].int().tolist() == [0, 0, 0, 1, 1, 1]  # window: the last 2 back, image 1 ahead


def reference_generate(ref, batch, max_new_tokens: int) -> list[list[int]]:
    with torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in rows]  # eos ends ours; it is not returned


def test_greedy_generation_is_token_identical(pair):
    ref, m, theirs, _ = pair
    messages = chat("Describe it.", 1)
    batch = reference_batch(theirs, [messages], [[photos()[0]]])
    reference = reference_generate(ref, batch, 20)[0]
    assert len(reference) == 20  # no early end: all 20 decoded positions are compared
    assert m.generate_tokens(messages, [photos()[0]], max_new_tokens=20) == reference
    text = m.generate(messages, [photos()[0]], max_new_tokens=20)
    assert text == m.decode(reference)
    assert "".join(m.stream(messages, [photos()[0]], max_new_tokens=20)) == text


def test_batched_left_padded_generation_matches_transformers(pair):
    ref, m, theirs, _ = pair
    messages = [chat("Hi", 1), chat("A much longer question about these two pictures", 2)]
    images = [[photos()[1]], [photos()[0], photos()[2]]]
    batch = reference_batch(theirs, messages, images)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the first prompt is left-padded
    reference = reference_generate(ref, batch, 20)
    together = m.generate(messages, images, max_new_tokens=20)
    alone = [m.generate(p, i, max_new_tokens=20) for p, i in zip(messages, images, strict=True)]
    assert together == alone == [m.decode(t) for t in reference]


def test_export_round_trip_loads_in_transformers_and_mmlm(pair, tmp_path):
    ref, m, theirs, _ = pair
    m.save_pretrained(tmp_path)
    again = type(ref).from_pretrained(tmp_path).eval()
    batch = reference_batch(theirs, [chat("Hi", 1)], [[photos()[1]]])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    reloaded = mmlm.load(tmp_path)
    assert (
        reloaded.processor(chat("Hi", 1), [photos()[1]])["input_ids"].tolist() == batch["input_ids"].tolist()
    )
    assert reloaded.generate(chat("Hi", 1), [photos()[1]], max_new_tokens=6) == m.generate(
        chat("Hi", 1), [photos()[1]], max_new_tokens=6
    )


def test_bad_inputs(pair, tmp_path):
    _, m, _, folder = pair
    with pytest.raises(
        InputError, match=r"^images: got 2 image\(s\) for 1 <start_of_image> placeholder\(s\)$"
    ):
        m.generate(chat("Hi", 1), photos()[:2])
    with pytest.raises(InputError, match=r"^format: Gemma 3 saves as a transformers folder only"):
        m.save_pretrained("unused", format="mmlm")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    settings = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(json.dumps({**settings, "do_pan_and_scan": True}))
    with pytest.raises(InputError) as error:
        mmlm.load(copy)
    assert str(error.value) == f"{copy}: do_pan_and_scan is true; mmlm reads Gemma 3 images as one view each"
    (copy / "preprocessor_config.json").write_text(json.dumps(settings))
    (copy / "processor_config.json").write_text(json.dumps({"image_seq_length": 9}))
    with pytest.raises(InputError) as error:
        mmlm.load(copy)
    assert str(error.value) == (
        f"{copy}: image_seq_length 9 in processor_config.json, but the model makes "
        f"{m.model.image_tokens} tokens per image (mm_tokens_per_image)"
    )
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "mm_tokens_per_image": 5}))
    with pytest.raises(InputError) as error:
        mmlm.load(copy)
    assert str(error.value) == (
        f"{copy / 'config.json'}: mm_tokens_per_image: got 5; expected a square that divides the tower's 8x8 grid"
    )


def test_budget_counts_the_slots_an_image_fills(pair, capsys):
    _, m, _, folder = pair
    assert main(["budget", "--model", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "gemma3 (Gemma3ForConditionalGeneration)"
    assert report["styles"][0]["kind"] == "pooled"
    assert report["styles"][0]["visual_tokens"] == m.model.image_tokens
    filled = m.processor(chat("Hi", 1), [photos()[0]])["input_ids"] == m.config.image_token_id
    assert int(filled.sum()) == m.model.image_tokens


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """A tiny Gemma3ForCausalLM (model_type gemma3_text) with final logit soft-capping, and mmlm's load of it."""
    folder = tmp_path_factory.mktemp("gemma3_text")
    write_lm_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=3.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15, tie_word_embeddings=False,
    )  # fmt: skip
    ref = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)
    ref.save_pretrained(folder)
    return ref, mmlm.load(folder)


def test_text_only_lm_matches_transformers(text_pair):
    ref, m = text_pair
    prompt = "a cat sitting on a wooden bench near the window"
    ids, _ = m.encode([prompt])
    assert ids.shape[1] > 2 * ref.config.sliding_window  # the prompt crosses the window
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        ours = m.model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert float(ours.abs().max()) < 3.0  # soft-capped at 3
    with torch.no_grad():
        out = ref.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
        )
    reference = out[0, ids.shape[1] :].tolist()
    assert len(reference) == 20 and EOS not in reference
    assert m.generate(prompt, max_new_tokens=20) == m.decode(reference)
