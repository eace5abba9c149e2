"""A LLaVA folder as transformers 5 saves it (processor_config.json with the image processor nested in it,
chat_template.jinja, no preprocessor_config.json) loads in mmlm with transformers' processing, logits and
greedy tokens; the processor's image-token count must agree with the model's; mmlm's LLaVA export works in
transformers' AutoProcessor."""

import json
import shutil

import pytest
import torch
import transformers
from PIL import Image
from skimage import data

import mmlm
from fixtures_vlm import LLAVA_TEMPLATE, write_tiny_llava_processor_save
from mmlm.errors import InputError
from mmlm.processing.chat import ChatTemplate

TWO_IMAGES = "USER: <image>\nWhat is in the picture? And here: <image>\nASSISTANT:"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]


def photos():
    # two photographs of different sizes and aspect ratios (512x512 and 400x600)
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "llava"
    select = "default" if request.param == "clip" else "full"
    ref, processor = write_tiny_llava_processor_save(folder, tower=request.param, select=select)
    return ref, processor, folder, mmlm.load(folder)


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_transformers_5_writes_processor_config_and_no_preprocessor_config(saved):
    _, _, folder, _ = saved
    files = {p.name for p in folder.iterdir()}
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json"} <= files
    assert "preprocessor_config.json" not in files
    assert "image_processor" in json.loads((folder / "processor_config.json").read_text())


def test_processor_output_equals_llava_processor(saved):
    _, processor, _, m = saved
    theirs = processor(text=TWO_IMAGES, images=photos(), return_tensors="pt")
    ours = m.processor(TWO_IMAGES, photos())
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-6, rtol=0)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    image_id = m.config.image_token_id
    assert int((theirs["input_ids"] == image_id).sum()) == 2 * m.model.image_tokens
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert m.processor.chat_template.render_text(MESSAGES, add_generation_prompt=True) == text


def test_logits_match_transformers(saved):
    ref, processor, _, m = saved
    batch = processor(text=TWO_IMAGES, images=photos(), return_tensors="pt")
    with torch.no_grad():
        theirs = ref(**batch).logits
        ours = m.model(batch["input_ids"], batch["pixel_values"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_20_tokens_equal_transformers_generate(saved):
    ref, processor, _, m = saved
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    batch = processor(text=text, images=[photos()[1]], return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=20, do_sample=False)
    theirs = out[0, batch["input_ids"].shape[1] :].tolist()
    theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs  # eos ends ours; it is not returned
    assert len(theirs) == 20  # the comparison covers all 20 steps, not an early end
    assert m.generate_tokens(MESSAGES, [photos()[1]], max_new_tokens=20) == theirs


def test_a_different_token_count_in_processor_config_is_one_line(saved, tmp_path):
    ref, _, folder, m = saved
    folder = copy_of(folder, tmp_path)
    path = folder / "processor_config.json"
    settings = json.loads(path.read_text())
    extra = settings["num_additional_image_tokens"]
    edit_json(path, num_additional_image_tokens=extra + 1)
    select = settings["vision_feature_select_strategy"]
    with pytest.raises(InputError) as error:
        mmlm.load(folder)
    assert str(error.value) == (
        f"{path}: the processor expands an image into {m.model.image_tokens + 1} tokens (patch_size 8 on "
        f"32x32 pixels, num_additional_image_tokens {extra + 1}, vision_feature_select_strategy {select!r}) "
        f"but {folder / 'config.json'} gives {m.model.image_tokens} image features per image; expected them equal"
    )
    # transformers fails on such a folder too, later, at the first forward pass
    processor = transformers.AutoProcessor.from_pretrained(folder, backend="pil")
    batch = processor(text=TWO_IMAGES, images=photos(), return_tensors="pt")
    with pytest.raises(ValueError, match="do not match"), torch.no_grad():
        ref(**batch)


def test_image_seq_length_must_agree_with_the_model(saved, tmp_path):
    _, _, folder, m = saved
    folder = copy_of(folder, tmp_path)
    edit_json(folder / "processor_config.json", image_seq_length=7)
    with pytest.raises(InputError) as error:
        mmlm.load(folder)
    assert str(error.value) == (
        f"{folder / 'processor_config.json'}: the processor expands an image into 7 tokens (image_seq_length) "
        f"but {folder / 'config.json'} gives {m.model.image_tokens} image features per image; expected them equal"
    )
    edit_json(folder / "processor_config.json", image_seq_length=m.model.image_tokens)
    assert mmlm.load(folder).model.image_tokens == m.model.image_tokens


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "{path}: invalid JSON (Expecting property name enclosed in double quotes at character 1)"),
        ('{"image_processor": [1, 2]}', "{path}: image_processor: expected an object, got list"),
        ('{"image_processor": {}, "patch_size": "8"}', "{path}: patch_size: got '8'; expected a non-negative integer"),
        (None, '{folder}: no image processor settings: expected preprocessor_config.json, or processor_config.json with an "image_processor" object'),
    ],
    ids=["not-json", "image-processor-not-object", "patch-size-not-int", "neither-file"],
)  # fmt: skip
def test_bad_processor_files_are_one_line(saved, tmp_path, text, message):
    _, _, folder, _ = saved
    folder = copy_of(folder, tmp_path)
    path = folder / "processor_config.json"
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    with pytest.raises(InputError) as error:
        mmlm.load(folder)
    assert str(error.value) == message.format(path=path, folder=folder)


def test_chat_template_in_processor_config_wins_as_in_transformers(saved, tmp_path):
    _, _, folder, _ = saved
    folder = copy_of(folder, tmp_path)
    # older processor saves kept the template in processor_config.json; transformers prefers it to the files
    other = (
        "{% for m in messages %}<<{{ m['role'] }}>>{% endfor %}{% if add_generation_prompt %}BOT:{% endif %}"
    )
    edit_json(folder / "processor_config.json", chat_template=other)
    assert (folder / "chat_template.jinja").read_text() == LLAVA_TEMPLATE
    theirs = transformers.AutoProcessor.from_pretrained(folder, backend="pil")
    expected = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert expected == "<<user>>BOT:"
    assert ChatTemplate.from_pretrained(folder).render_text(MESSAGES, add_generation_prompt=True) == expected


def test_mmlm_llava_export_works_in_transformers_autoprocessor(saved, tmp_path):
    _, _, _, m = saved
    m.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()  # the layout transformers 4 and 5 both read
    processor = transformers.AutoProcessor.from_pretrained(tmp_path, backend="pil")
    assert isinstance(processor, transformers.LlavaProcessor)
    theirs = processor(text=TWO_IMAGES, images=photos(), return_tensors="pt")
    ours = m.processor(TWO_IMAGES, photos())
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-6, rtol=0)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == m.processor.chat_template.render_text(MESSAGES, add_generation_prompt=True)
    assert mmlm.load(tmp_path).model.image_tokens == m.model.image_tokens
