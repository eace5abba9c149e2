"""mmlm.load on transformers BLIP-2 (OPT) folders: Blip2Processor's ids and pixels, logits within 1e-4, greedy
generations token-identical to transformers' generate (one by one and batched), export back, budget, bad input."""

import json

import pytest
import torch
import transformers
from PIL import Image
from skimage import data

import mmlm
from fixtures_blip2 import CONFIGS, write_tiny_blip2
from mmlm.checkpoints.hf_blip2 import fuse_vision_qkv_bias
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.inference.vlm import GenerativeModel

EOS = 2


def photos() -> list[Image.Image]:
    """Photographs of several sizes and aspect ratios (square, 4:3 landscape, 3:2 landscape, grey)."""
    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.camera()]
    return [Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref, processor = write_tiny_blip2(folder, request.param)
    return ref, processor, mmlm.load(folder), folder


def new_tokens(out: torch.Tensor, prompt_length: int) -> list[list[int]]:
    rows = []
    for row in out[:, prompt_length:].tolist():
        rows.append(row[: row.index(EOS)] if EOS in row else row)  # eos ends ours; it is not returned
    return rows


def test_loads_with_k_image_tokens(pair):
    ref, _, m, _ = pair
    assert isinstance(m, GenerativeModel)
    assert m.model.image_tokens == m.processor.tokens_per_tile == ref.config.num_query_tokens
    assert m.config.patches == 17  # 4×4 patches and the class token, all read by the Q-Former


@pytest.mark.parametrize("prompt", ["Question: what is in the picture? Answer:", ""])
def test_processor_matches_blip2_processor(pair, prompt):
    _, processor, m, _ = pair
    for image in photos():
        theirs = processor(images=[image], text=[prompt], return_tensors="pt")
        ours = m.processor(prompt, [image])
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()  # K image tokens, then </s>, text
        assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
        assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() < 1e-5


def test_placeholders_written_in_the_prompt_are_moved_before_bos(pair):
    _, processor, m, _ = pair
    theirs = processor(images=[photos()[0]], text=["Describe it."], return_tensors="pt")["input_ids"]
    assert m.processor("<image>\nDescribe it.", [photos()[0]])["input_ids"].tolist() == theirs.tolist()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    ids = m.processor(messages, [photos()[0]])["input_ids"][0]
    k = m.model.image_tokens
    assert ids[:k].tolist() == [m.config.image_token_id] * k and int(ids[k]) == EOS


def test_logits_match_transformers(pair):
    ref, processor, m, _ = pair
    images = photos()[:2]
    theirs_in = processor(images=images, text=["What is it?", "Is this a cat or a cup of coffee?"],
                          padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        theirs = ref(**theirs_in).logits
        for row, image in enumerate(images):  # each prompt alone, without padding
            text = ["What is it?", "Is this a cat or a cup of coffee?"][row]
            batch = m.processor(text, [image])
            ours = m.model(batch["input_ids"], batch["pixel_values"]).logits[0]
            real = theirs_in["attention_mask"][row].bool()
            torch.testing.assert_close(ours, theirs[row][real], atol=1e-4, rtol=0)


def test_greedy_generation_of_20_tokens_is_identical(pair):
    ref, processor, m, _ = pair
    prompt = "Question: what is in the picture? Answer:"
    for image in photos()[:3]:
        batch = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**batch, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        theirs = new_tokens(out, batch["input_ids"].shape[1])[0]
        assert len(theirs) == 20
        ours = m.generate_tokens(prompt, [image], max_new_tokens=20)
        assert ours == theirs
        assert m.generate(prompt, [image], max_new_tokens=20) == m.decode(theirs)


def test_batched_left_padded_generation_is_identical(pair):
    ref, processor, m, _ = pair
    prompts = ["A photo of", "Question: what colour is the thing in the middle? Answer:", ""]
    images = photos()[1:4]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=20, do_sample=False)
    theirs = new_tokens(out, batch["input_ids"].shape[1])
    together = m.generate(prompts, [[i] for i in images], max_new_tokens=20)
    assert together == [m.decode(t) for t in theirs]
    assert together == [m.generate(p, [i], max_new_tokens=20) for p, i in zip(prompts, images, strict=True)]


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    ref, processor, m, _ = pair
    m.save_pretrained(tmp_path)
    again = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    again_processor = transformers.Blip2Processor.from_pretrained(tmp_path)
    batch = processor(images=[photos()[2]], text=["Hi"], return_tensors="pt")
    assert again_processor(images=[photos()[2]], text=["Hi"])["input_ids"] == batch["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    reloaded = mmlm.load(tmp_path)
    assert reloaded.generate("Hi", [photos()[2]], max_new_tokens=8) == m.generate("Hi", [photos()[2]],
                                                                                 max_new_tokens=8)  # fmt: skip


def test_budget_counts_k_tokens_per_image(pair, capsys):
    ref, _, _, folder = pair
    assert main(["budget", "--model", str(folder), "--json"]) == 0
    styles = json.loads(capsys.readouterr().out)["styles"]
    k = ref.config.num_query_tokens
    assert (styles[0]["style"], styles[0]["visual_tokens"]) == (f"qformer K={k}", k)


def test_bad_inputs(pair):
    _, _, m, _ = pair
    with pytest.raises(InputError, match=r"^images: got 1 image\(s\) for 2 <image> placeholder\(s\)$"):
        m.generate("<image><image> Hi", [photos()[0]])
    with pytest.raises(InputError, match="context"):
        m.generate("word " * 200, [photos()[0]])


def edited_folder(tmp_path, edit):
    write_tiny_blip2(tmp_path, "k4-every1-opt2x32")
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["text_config"].update(model_type="t5"),
            "mmlm reads BLIP-2 with OPT, not encoder-decoder",
        ),
        (lambda c: c.pop("image_token_index"), "image_token_index: missing"),
        (lambda c: c["text_config"].update(do_layer_norm_before=False), "mmlm reads pre-norm OPT"),
        (lambda c: c["text_config"].update(word_embed_proj_dim=8), "project_in/project_out"),
        (lambda c: c["vision_config"].update(num_hidden_layers=3), "vision_model.encoder.layers.2"),
    ],
)
def test_bad_config_is_one_line_input_error(tmp_path, edit, message):
    folder = edited_folder(tmp_path, edit)
    with pytest.raises(InputError, match=message) as error:
        mmlm.load(folder)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


def test_older_files_q_bias_and_v_bias_are_fused_with_a_zero_k_bias() -> None:
    q, v = torch.randn(4), torch.randn(4)
    weights = {
        "vision_model.encoder.layers.0.self_attn.q_bias": q,
        "vision_model.encoder.layers.0.self_attn.v_bias": v,
    }
    fuse_vision_qkv_bias(weights)
    assert list(weights) == ["vision_model.encoder.layers.0.self_attn.qkv.bias"]
    assert torch.equal(
        weights["vision_model.encoder.layers.0.self_attn.qkv.bias"], torch.cat([q, torch.zeros(4), v])
    )
