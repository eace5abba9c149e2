"""Chat templates, the VLM processor and dynamic resolution, checked against transformers on an offline tokenizer."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mmlm.errors import InputError
from mmlm.processing.anyres import DynamicResolution, select_best_resolution, tile_resolutions
from mmlm.processing.chat import ChatTemplate
from mmlm.processing.image import ImageProcessor, PixelNormalize
from mmlm.processing.qwen2_vl_image import Qwen2VLPatches
from mmlm.processing.vlm_processor import IGNORE_INDEX, VLMProcessor

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
CORPUS = [
    "You are a helpful assistant. What color is the square? How many circles are there? red blue green",
    "USER: ASSISTANT: user assistant system Is there a yellow star in the image? yes no 1 2 3",
    "Describe the image. a small red circle at the top left and a large blue square on the right",
]
# Real-world templates, as their checkpoints ship them: Qwen2 (ChatML with a default system prompt),
# Llama 3 (bos in the template, trimmed content) and llava-1.5-hf (images first, {% generation %} tags).
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAVA15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}"
    "{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}"
    "{% endif %}"
)
TEXT_CHAT = [
    {"role": "user", "content": "What color is the square?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How many circles are there?"},
    {"role": "assistant", "content": " 2 "},
]
PARTS_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "Is there a star?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
]


def _write_tokenizer(folder, template: str | None):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # Llama-style: the tokenizer itself adds only <s>
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "model_max_length": 512}  # fmt: skip
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    names = {"qwen2": QWEN2, "llama3": LLAMA3, "llava15": LLAVA15, "none": None}
    return {name: _write_tokenizer(root / name, template) for name, template in names.items()}


def _hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _processor(folder, tokens_per_tile=4, image_size=8, **options) -> VLMProcessor:
    return VLMProcessor.from_pretrained(folder, ImageProcessor.clip(image_size), tokens_per_tile, **options)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---- chat templates ----


SYSTEM = {"role": "system", "content": "Answer in one word."}


@pytest.mark.parametrize(
    ("name", "chat"),
    [
        ("qwen2", TEXT_CHAT),
        ("qwen2", [SYSTEM, *TEXT_CHAT]),
        ("llama3", [SYSTEM, *TEXT_CHAT]),
        ("llava15", PARTS_CHAT),
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers_apply_chat_template(folders, name, chat, add_generation_prompt) -> None:
    messages = chat[:-1] if add_generation_prompt else chat
    ours = ChatTemplate.from_pretrained(folders[name]).render_text(messages, add_generation_prompt)
    reference = _hf_tokenizer(folders[name]).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == reference


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_text_only_ids_equal_transformers(folders, name) -> None:
    hf = _hf_tokenizer(folders[name])
    chat = [SYSTEM, *TEXT_CHAT]
    ours = _processor(folders[name]).encode(chat)
    text = hf.apply_chat_template(chat, tokenize=False)
    # transformers' processors add the tokenizer's specials unless the template starts with bos
    reference = hf(text, add_special_tokens=not text.startswith("<s>"))["input_ids"]
    assert ours.input_ids.tolist() == reference


def test_chat_template_file_precedence(tmp_path, folders) -> None:
    folder = _write_tokenizer(tmp_path / "t", QWEN2)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA3}))
    assert ChatTemplate.from_pretrained(folder).source == LLAMA3
    (folder / "chat_template.jinja").write_text(LLAVA15)
    assert ChatTemplate.from_pretrained(folder).source == LLAVA15
    assert ChatTemplate.from_pretrained(folders["none"]) is None


def test_builtin_llava_v1_and_chatml_strings() -> None:
    chat = [{"role": "system", "content": "Be brief."}, *PARTS_CHAT]
    assert ChatTemplate.llava_v1().render_text(chat[:2], add_generation_prompt=True) == (
        "Be brief. USER: <image>\nWhat color is the square? ASSISTANT:"
    )
    rendered = ChatTemplate.chatml().render(chat)
    assert rendered.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color is the square?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nIs there a star?<image>\n<|im_end|>\n"
        "<|im_start|>assistant\nno<|im_end|>\n"
    )
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == ["red<|im_end|>", "no<|im_end|>"]


def test_answer_spans_follow_what_the_template_does_to_the_content(folders) -> None:
    # Llama 3 trims " 2 " to "2"; the span still covers exactly the rendered answer and its <|eot_id|>.
    rendered = ChatTemplate.from_pretrained(folders["llama3"]).render(TEXT_CHAT)
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == ["red<|eot_id|>", "2<|eot_id|>"]
    # An answer that also occurs earlier in the prompt is still found in its own turn.
    chat = [{"role": "user", "content": "red or blue?"}, {"role": "assistant", "content": "red"}]
    rendered = ChatTemplate.chatml().render(chat)
    ((start, end),) = rendered.answer_spans
    assert start == rendered.text.index("assistant\nred") + len("assistant\n")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(["llava_v1", "chatml", "qwen2", "llama3"]),
    answers=st.lists(st.text(alphabet="ab <>/|\n\ue000\ue0010", max_size=6), min_size=2, max_size=4),
)
def test_one_probe_spans_equal_one_probe_per_answer(folders, name, answers) -> None:
    # The one-render shortcut must give the per-answer probes' spans wherever it answers at all, with answers
    # that are empty, padded (Llama 3 trims them), or contain the sentinel's characters or end-of-turn markers.
    template = (
        getattr(ChatTemplate, name)()
        if name in ("llava_v1", "chatml")
        else ChatTemplate.from_pretrained(folders[name])
    )
    chat = [m for k, a in enumerate(answers) for m in ({"role": "user", "content": f"q{k}?"},
                                                        {"role": "assistant", "content": a})]  # fmt: skip
    text = template.render_text(chat)
    fast = template._verbatim_spans(chat, text, False)
    if fast is not None:
        assert fast == template._probe_spans(chat, text, False)
    gap = template.answer_gap  # render's spans start where generation starts: the gap before an answer is in
    expected = tuple((a - len(gap) if gap and text[max(0, a - len(gap)) : a] == gap else a, b)
                     for a, b in template._probe_spans(chat, text, False))  # fmt: skip
    assert template.render(chat).answer_spans == expected


@pytest.mark.parametrize("name", ["llava_v1", "chatml", "qwen2", "llama3"])
def test_an_answers_labels_start_where_generation_starts(folders, name) -> None:
    # LLaVA v1 writes "ASSISTANT: red" but prompts generation with "ASSISTANT:": the space is the model's to
    # write, so it is labelled (a BPE that makes it a token of its own otherwise never learns to emit it)
    template = (
        getattr(ChatTemplate, name)()
        if name in ("llava_v1", "chatml")
        else ChatTemplate.from_pretrained(folders[name])
    )
    question = {"role": "user", "content": "What colour?"}
    rendered = template.render([question, {"role": "assistant", "content": "red"}])
    ((start, _),) = rendered.answer_spans
    assert rendered.text[:start] == template.render_text([question], add_generation_prompt=True)
    assert template.answer_gap == (" " if name == "llava_v1" else "")


def test_the_one_probe_shortcut_answers_for_verbatim_templates_and_not_for_trimming_ones(folders) -> None:
    chat = TEXT_CHAT[:3] + [{"role": "assistant", "content": "2"}]
    text = ChatTemplate.chatml().render_text(chat)
    assert ChatTemplate.chatml()._verbatim_spans(chat, text, False) is not None
    llama3 = ChatTemplate.from_pretrained(folders["llama3"])
    assert llama3._verbatim_spans(TEXT_CHAT, llama3.render_text(TEXT_CHAT), False) is None  # " 2 " -> "2"


def test_template_sandbox_and_errors() -> None:
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InputError, match="chat_template"):
        escape.render_text([{"role": "user", "content": "hi"}])
    raising = ChatTemplate("{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(InputError, match="only user and assistant roles"):
        raising.render_text([{"role": "user", "content": "hi"}])
    with pytest.raises(InputError, match="Jinja"):
        ChatTemplate("{% for %}")
    with pytest.raises(InputError, match=r"messages\[1\].role"):
        ChatTemplate.chatml().render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(InputError, match=r"messages\[0\].content\[0\].type"):
        ChatTemplate.chatml().render([{"role": "user", "content": [{"type": "video"}]}])


# ---- the processor ----


def test_llava_processor_parity_ids_and_pixels(folders) -> None:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    hf = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        tokenizer=_hf_tokenizer(folders["llava15"]),
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15,
    )
    images = [_image(12, 9, seed=1), _image(7, 10, seed=2)]
    prompt = hf.apply_chat_template(PARTS_CHAT[:3], add_generation_prompt=True)
    reference = hf(text=prompt, images=images, return_tensors="pt")
    ours = _processor(folders["llava15"], tokens_per_tile=16)(PARTS_CHAT[:3], images)
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)


def test_image_tokens_expand_in_image_and_tile_order(folders) -> None:
    tiler = DynamicResolution(tile_size=8, resolutions=[(8, 16), (16, 8), (16, 16)])
    processor = _processor(folders["none"], tokens_per_tile=3, dynamic_resolution=tiler)
    wide, tall, square = _image(20, 9, 1), _image(9, 20, 2), _image(30, 30, 3)
    prompt = "<image> first <image>\nthen text then <image>"
    sample = processor.encode(prompt, [wide, tall, square])
    assert sample.image_tiles == [3, 3, 5] and sample.image_grids == [(1, 2), (2, 1), (2, 2)]
    assert [processor.image_token_count(i.height, i.width) for i in (wide, tall, square)] == [9, 9, 15]
    assert sample.pixel_values.shape == (11, 3, 8, 8)
    is_image = (sample.input_ids == processor.image_token_id).int()
    # three runs of image tokens, of 3·3, 3·3 and 5·3 tokens, split by the text between placeholders
    runs = [len(run) for run in "".join(map(str, is_image.tolist())).split("0") if run]
    assert runs == [9, 9, 15]
    assert (sample.labels == IGNORE_INDEX).all()


def test_labels_are_exactly_the_answers_and_end_of_turn(folders) -> None:
    processor = _processor(folders["none"], chat_template=ChatTemplate.chatml())
    sample = processor.encode(PARTS_CHAT, [_image(8, 8), _image(8, 8)])
    tokenizer = Tokenizer.from_file(str(folders["none"] / "tokenizer.json"))
    labelled = sample.labels != IGNORE_INDEX
    runs, current = [], []
    for token, keep in zip(sample.input_ids.tolist(), labelled.tolist(), strict=True):
        if keep:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    assert [tokenizer.decode(run, skip_special_tokens=False) for run in runs] == [
        "red<|im_end|>",
        "no<|im_end|>",
    ]
    assert torch.equal(sample.labels[labelled], sample.input_ids[labelled])


def test_raw_prompt_with_answer_labels_answer_and_eos(folders) -> None:
    processor = _processor(folders["none"])
    sample = processor.encode("<image>\n", [_image(8, 8)], answer="a small red circle")
    tokenizer = Tokenizer.from_file(str(folders["none"] / "tokenizer.json"))
    answer = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert tokenizer.decode(answer, skip_special_tokens=False) == "a small red circle</s>"
    assert sample.input_ids[0] == tokenizer.token_to_id("<s>")


def test_truncation_never_cuts_image_tokens_and_drops_are_counted(folders) -> None:
    processor = _processor(folders["none"], tokens_per_tile=4, max_length=12)
    image = _image(8, 8)
    short = processor.encode("<image>\n", [image], answer="red")
    long_text = processor.encode("<image>\n", [image], answer="a small red circle at the top left " * 3)
    late_image = processor.encode("Describe the image. " * 3 + "<image>", [image])
    assert short is not None and len(short.input_ids) <= 12
    assert long_text is not None and len(long_text.input_ids) == 12  # cut in the answer: kept, truncated
    assert late_image is None  # cutting would split the image's 4 tokens: dropped
    batch = processor.collate([short, late_image, long_text])
    assert batch["num_dropped"] == 1 and batch["input_ids"].shape == (2, 12)
    assert batch["pixel_values"].shape[0] == int(batch["image_tiles"].sum()) == 2


def test_collate_pads_right_for_training_and_left_for_generation(folders) -> None:
    processor = _processor(folders["none"])
    samples = [processor.encode("<image>\nred", [_image(8, 8)]), processor.encode("blue")]
    right = processor.collate(samples, "right")
    left = processor.collate(samples, "left")
    pad = processor.pad_token_id
    assert right["attention_mask"][1].tolist()[-1] == 0 and right["input_ids"][1, -1] == pad
    assert left["attention_mask"][1].tolist()[0] == 0 and left["input_ids"][1, 0] == pad
    assert left["input_ids"][1, -1] == right["input_ids"][1, int(right["attention_mask"][1].sum()) - 1]
    assert right["images_per_sample"].tolist() == [1, 0]
    n_image_tokens = int((right["input_ids"] == processor.image_token_id).sum())
    assert n_image_tokens == right["pixel_values"].shape[0] * processor.tokens_per_tile


def test_images_can_ride_in_message_parts(folders) -> None:
    processor = _processor(folders["none"], chat_template=ChatTemplate.chatml())
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image(9, 9)}, {"type": "text", "text": "hi"}],
        }
    ]
    assert processor.encode(chat).image_sizes == [(9, 9)]


@pytest.mark.parametrize(
    ("prompt", "n_images"), [("<image> and <image>", 1), ("<image>", 2), ("no image", 1)]
)
def test_placeholder_and_image_counts_must_agree(folders, prompt, n_images) -> None:
    with pytest.raises(InputError, match="images: got"):
        _processor(folders["none"]).encode(prompt, [_image(8, 8)] * n_images)


def test_bad_images_and_tokenizers_are_input_errors(folders, tmp_path) -> None:
    with pytest.raises(InputError, match="0x5"):
        _processor(folders["none"]).encode("<image>", [Image.new("RGB", (0, 5))])
    tokenizer = Tokenizer.from_file(str(folders["none"] / "tokenizer.json"))
    with pytest.raises(InputError, match="image_token"):
        VLMProcessor(tokenizer, ImageProcessor.clip(8), 4, image_token="<img>")


# ---- dynamic resolution ----


def test_select_best_resolution_matches_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution as reference

    pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (336, 336), (100, 1000), (1000, 100), (672, 673), (5000, 20), (337, 671)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(200)]
    for size in sizes:
        for resolutions in (pinpoints, tile_resolutions(224, 6)):
            assert select_best_resolution(size, resolutions) == tuple(reference(size, resolutions)), size


@pytest.mark.parametrize("size", [(20, 9), (9, 31), (16, 16), (3, 40)])
def test_tiles_match_llava_next_pixels(size) -> None:
    from transformers import LlavaNextImageProcessorPil

    t = 8
    pinpoints = [[8, 16], [16, 8], [16, 16], [24, 8], [8, 24]]
    image = _image(*size, seed=sum(size))
    hf = LlavaNextImageProcessorPil(
        size={"shortest_edge": t}, crop_size={"height": t, "width": t}, image_grid_pinpoints=pinpoints
    )
    reference = hf(image, return_tensors="pt")["pixel_values"][0]
    tiled = DynamicResolution(t, [tuple(p) for p in pinpoints])(image)
    ours = ImageProcessor.clip(t)(tiled.tiles)
    assert len(tiled.tiles) == 1 + tiled.grid[0] * tiled.grid[1] == reference.shape[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_max_side_caps_before_choosing_the_grid() -> None:
    tiler = DynamicResolution(tile_size=8, max_tiles=4, max_side=16)
    assert tiler.capped_size(100, 50) == (16, 8)
    assert tiler.grid(100, 50) == (2, 1) and tiler.num_tiles(100, 50) == 3
    tiled = tiler(_image(50, 100))
    assert tiled.size == (100, 50) and all(tile.size == (8, 8) for tile in tiled.tiles)
    with pytest.raises(InputError, match="resolutions"):
        DynamicResolution(tile_size=8, resolutions=[(8, 12)])


def test_a_training_copy_carries_uint8_tiles_that_normalise_to_the_float_ones(folders) -> None:
    tiler = DynamicResolution(tile_size=8, resolutions=[(8, 16), (16, 8), (16, 16)])
    processor = _processor(folders["none"], tokens_per_tile=3, dynamic_resolution=tiler)
    images, prompt = [_image(20, 9, 1), _image(30, 30, 3)], "<image> and <image>"
    small, full = processor.with_uint8_pixels().encode(prompt, images), processor.encode(prompt, images)
    assert small.pixel_values.dtype == torch.uint8 and full.pixel_values.dtype == torch.float32
    assert small.pixel_values.shape == full.pixel_values.shape == (8, 3, 8, 8)  # anyres tiles too
    assert torch.equal(small.input_ids, full.input_ids) and torch.equal(small.labels, full.labels)
    normalised = PixelNormalize(processor.image_processor)(small.pixel_values)
    torch.testing.assert_close(normalised, full.pixel_values, atol=1e-6, rtol=0)
    patches = VLMProcessor.from_pretrained(folders["none"], Qwen2VLPatches(patch_size=4, merge_size=1), 3)
    assert patches.with_uint8_pixels() is patches  # Qwen2-VL's flattened patches stay float32
