"""mmlm.load on transformers LLaVA-NeXT folders: the processor's pixels, image sizes and image-token expansion
identical to LlavaNextProcessor's, logits within 1e-4 of LlavaNextForConditionalGeneration, greedy generation
token-identical to transformers' generate (one by one and batched with left padding), export back to
transformers, and one-line errors for what mmlm does not read."""

import json

import pytest
import torch
import transformers
from PIL import Image
from skimage import data

import mmlm
from fixtures_vlm import write_llava_tokenizer, write_tiny_llava_next
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.inference.vlm import GenerativeModel
from mmlm.train.vlm_loop import RowLosses, batch_loss

CONFIGS = {
    # CLIP drops its class token ("default"); a Llama LM; transformers 4's preprocessor_config.json
    "clip-default-llama": dict(tower="clip", select="default", lm="llama"),
    # SigLIP keeps every token ("full"); other grids (3x1 and 1x3, no 1x1); a Qwen2 LM; processor_config.json
    "siglip-full-qwen2": dict(tower="siglip", select="full", lm="qwen2", processor_file=True,
                              pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]),
}  # fmt: skip
EOS = 2


def photos() -> list[Image.Image]:
    """Return three photographs of different aspect ratios: 512x512, 400x600 and a tall 512x160 crop."""
    astronaut, coffee = data.astronaut(), data.coffee()
    return [Image.fromarray(astronaut), Image.fromarray(coffee), Image.fromarray(astronaut[:, 200:360])]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref, processor = write_tiny_llava_next(folder, **CONFIGS[request.param])
    return ref, processor, mmlm.load(folder), folder


def until_eos(tokens: list[int]) -> list[int]:
    """Return the tokens before the first end token (mmlm stops there and does not return it)."""
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def test_loads_as_a_generative_model(pair):
    _, _, m, _ = pair
    assert isinstance(m, GenerativeModel) and m.source_format == "llava_next"
    assert m.config.patch_merge == "spatial_unpad" and m.model.image_tokens == 16  # 4x4 patches per tile


def test_processor_matches_llava_next_processor(pair):
    _, processor, m, _ = pair
    prompt = "USER: <image>\nOne <image>\ntwo <image>\nthree. ASSISTANT:"
    ours = m.processor(prompt, photos())
    theirs = processor(text=prompt, images=photos(), return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert (
        ours["image_sizes"].tolist() == theirs["image_sizes"].tolist() == [[512, 512], [400, 600], [512, 160]]
    )
    # transformers pads every image to the most tiles; mmlm concatenates each image's own
    tiles = ours["image_tiles"].tolist()
    padded = torch.cat([pixels[:n] for pixels, n in zip(theirs["pixel_values"], tiles, strict=True)])
    torch.testing.assert_close(ours["pixel_values"], padded, rtol=0, atol=0)
    counts = [m.processor.image_token_count(h, w) for h, w in ours["image_sizes"].tolist()]
    assert len(set(counts)) == 3  # the count follows each image's aspect ratio
    assert int((ours["input_ids"] == m.config.image_token_id).sum()) == sum(counts)


def test_logits_match_transformers(pair):
    ref, processor, m, _ = pair
    prompt = "USER: <image>\nWhat is in the picture? And here: <image>\nASSISTANT:"
    images = [photos()[1], photos()[2]]
    batch = m.processor(prompt, images)
    theirs_inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        theirs = ref(**theirs_inputs).logits
        ours = m.model(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_generation_is_token_identical(pair):
    ref, processor, m, _ = pair
    prompts = [
        "USER: <image>\nDescribe it. ASSISTANT:",
        "USER: <image>\nA much longer question about it ASSISTANT:",
    ]
    images = [[photos()[1]], [photos()[2]]]
    alone = []
    for prompt, image in zip(prompts, images, strict=True):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=20, do_sample=False)
        theirs = until_eos(out[0, inputs["input_ids"].shape[1] :].tolist())
        assert m.generate_tokens(prompt, image, max_new_tokens=20) == theirs
        alone.append(m.decode(theirs))
        assert m.generate(prompt, image, max_new_tokens=20) == alone[-1]
        assert "".join(m.stream(prompt, image, max_new_tokens=20)) == alone[-1]
    inputs = processor(text=prompts, images=[i[0] for i in images], padding=True, padding_side="left",
                       return_tensors="pt")  # fmt: skip
    assert (inputs["attention_mask"][:, 0] == 0).any()  # the shorter prompt is left-padded
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=20, do_sample=False)
    together = [m.decode(until_eos(row.tolist())) for row in out[:, inputs["input_ids"].shape[1] :]]
    assert together == alone == m.generate(prompts, images, max_new_tokens=20)


def test_training_loss_matches_transformers(pair):
    ref, _, m, _ = pair
    samples = [m.processor.encode("USER: <image>\nWhat is it? ASSISTANT:", [image], answer=" A photo.")
               for image in photos()[1:]]  # fmt: skip
    batch = m.processor.collate(samples, padding_side="right")
    row_loss, row_tokens = RowLosses(m.model)(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                              batch["pixel_values"], None, batch["image_frames"],
                                              batch["image_sizes"])  # fmt: skip
    with torch.no_grad():
        theirs = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                     labels=batch["labels"]).loss  # fmt: skip
    torch.testing.assert_close(batch_loss(row_loss, row_tokens).detach(), theirs, atol=1e-5, rtol=0)


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    ref, _, m, _ = pair
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_next"
    again = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    images = transformers.LlavaNextImageProcessorPil.from_pretrained(tmp_path)
    prompt = "USER: <image>\nHi <image>\nASSISTANT:"
    batch = m.processor(prompt, photos()[1:])
    theirs = images(photos()[1:], return_tensors="pt")
    assert theirs["image_sizes"].tolist() == batch["image_sizes"].tolist()
    with torch.no_grad():
        a = again(input_ids=batch["input_ids"], **theirs).logits
        b = ref(input_ids=batch["input_ids"], **theirs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    expected = m.generate(prompt, photos()[1:], max_new_tokens=6)
    assert mmlm.load(tmp_path).generate(prompt, photos()[1:], max_new_tokens=6) == expected
    own = m.save_pretrained(tmp_path / "mmlm", format="mmlm")  # mmlm's own folder keeps the tiling too
    assert json.loads((own / "config.json").read_text())["config"]["patch_merge"] == "spatial_unpad"
    assert mmlm.load(own).generate(prompt, photos()[1:], max_new_tokens=6) == expected


def test_bad_images(pair):
    _, _, m, _ = pair
    sliver = Image.fromarray(data.coffee()[:2])  # 2x600: no token row of its tiles survives un-padding
    with pytest.raises(InputError, match=r"^image 2x600 \(height x width\): too thin for its"):
        m.generate("USER: <image>\nHi ASSISTANT:", [sliver])
    with pytest.raises(InputError, match="placeholder"):
        m.generate("USER: <image>\n<image>\nHi ASSISTANT:", [photos()[0]])
    with pytest.raises(InputError, match="image_sizes: a spatial_unpad"):
        batch = m.processor("USER: <image>\nHi ASSISTANT:", [photos()[0]])
        m.model(batch["input_ids"], batch["pixel_values"])
    with pytest.raises(InputError, match=r"^pixel_values: got 5 tiles, but image_sizes \[\[10, 500\]\] make"):
        batch = m.processor("USER: <image>\nHi ASSISTANT:", [photos()[0]])
        m.model(batch["input_ids"], batch["pixel_values"], image_sizes=torch.tensor([[10, 500]]))


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(vision_feature_select_strategy="cls_patch"),
         "config.json: vision_feature_select_strategy: got 'cls_patch'; mmlm reads 'default' or 'full'"),
        (dict(vision_feature_select_strategy="full"),  # CLIP's class token would break the tiles' patch grid
         "patch_merge 'spatial_unpad': each tile gives 17 tokens, expected its 4x4 patch grid"),
        (dict(image_grid_pinpoints=[[32, 48]]),
         "image_grid_pinpoints: got [32, 48]; expected positive multiples of the tower's image_size 32"),
        (dict(image_grid_pinpoints=[[32, 64], [64, 32]]),
         "the image processor cuts 32-px tiles on image_grid_pinpoints [[32, 32], [32, 64], [64, 32], [64, 64]], "
         "but config.json's model merges 32-px tiles on [[32, 64], [64, 32]]"),
    ],
)  # fmt: skip
def test_unsupported_variants_give_one_line(tmp_path_factory, change, message):
    folder = tmp_path_factory.mktemp("variant")
    write_tiny_llava_next(folder, tower="clip", num_hidden_layers=1)
    edit_config(folder, **change)
    with pytest.raises(InputError) as error:
        mmlm.load(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_processor_tiles_need_one_square_size(tmp_path):
    write_tiny_llava_next(tmp_path, tower="clip", num_hidden_layers=1)
    settings = json.loads((tmp_path / "preprocessor_config.json").read_text())
    settings["crop_size"] = {"height": 24, "width": 24}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(InputError, match="mmlm's anyres tiles need the global view and the tiles the same"):
        mmlm.load(tmp_path)


# llava-hf/llava-v1.6-mistral-7b-hf's config.json in short (default image_grid_pinpoints: 336-px tiles)
LLAVA_V16_MISTRAL_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "image_token_index": 32000,
    "torch_dtype": "float16", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064,
                    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
}  # fmt: skip
RESOLUTIONS = [(400, 600), (336, 336), (1000, 300), (2000, 2000), (500, 80), (768, 1024)]


def budget_tokens(capsys, *argv) -> dict:
    assert main(["budget", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_budget_counts_tokens_as_llava_next_processor(tmp_path, capsys):
    folder = tmp_path / "tokenizer"
    write_llava_tokenizer(folder)
    reference = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    expected = reference._get_num_multimodal_tokens(image_sizes=RESOLUTIONS)["num_image_tokens"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAVA_V16_MISTRAL_7B))
    plans = [budget_tokens(capsys, "--config", config, "--resolution", f"{h}x{w}") for h, w in RESOLUTIONS]
    assert [p["styles"][0]["visual_tokens"] for p in plans] == expected
    # by hand, 24x24 tokens per tile: 400x600 -> 2x2 grid, a 48x48 canvas keeps 32 rows: 576 + 32·(48 + 1);
    # 336x336 -> 1x2 grid, a 24x48 canvas keeps 24 columns: 576 + 24·(24 + 1)
    assert expected[:2] == [2144, 1176]
    assert plans[0]["image"]["tiles"] == [2, 2] and plans[0]["views"] == 5


def test_budget_of_a_tiny_folder_matches_its_processor(pair, capsys):
    _, _, m, folder = pair
    for image in photos():
        plan = budget_tokens(capsys, "--model", folder, "--resolution", f"{image.height}x{image.width}")
        assert plan["styles"][0]["visual_tokens"] == m.processor.image_token_count(image.height, image.width)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--tiles", "2x2"],
            "--tiles: a LLaVA-NeXT model picks its grid from the image; give --resolution HxW",
        ),
        (["--resolution", "4x0"], "--resolution: got '4x0'; expected HEIGHTxWIDTH with positive integers"),
        (["--image-size", "28"], "--image-size: got 28; a LLaVA-NeXT model's tiles are its tower's 336 px"),
    ],
)
def test_budget_bad_input_is_one_line(tmp_path, capsys, argv, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAVA_V16_MISTRAL_7B))
    assert main(["budget", "--config", str(config), *argv]) != 0
    assert message in capsys.readouterr().err
