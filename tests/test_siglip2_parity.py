"""mmlm.load on transformers Siglip2Model (NaFlex) folders: the patches, mask and grids equal
Siglip2ImageProcessorPil's, and image and text embeddings and logits equal Siglip2Model's, on photographs of
several aspect ratios batched together (each padded to the patch budget)."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data

import mmlm
from fixtures_models import write_tiny_siglip2
from fixtures_text import write_siglip2_tokenizer
from mmlm.errors import InputError
from mmlm.inference.contrastive import ContrastiveModel
from mmlm.processing.naflex import NaFlexProcessor, size_for_max_patches

CONFIGS = {
    # a 4×4 position grid, up to 24 patches of 4 px, attention-pooling head
    "grid4-budget24-map": dict(num_patches=16, patch=4, max_num_patches=24),
    # a 5×5 grid, up to 40 patches of 2 px (grids larger than the position grid: upsampled positions)
    "grid5-budget40": dict(num_patches=25, patch=2, max_num_patches=40),
}


def photos() -> list[Image.Image]:
    """Photographs of four aspect ratios, one smaller than the patch budget's resolution."""
    return [
        Image.fromarray(data.astronaut()),  # 512×512
        Image.fromarray(data.coffee()),  # 400×600
        Image.fromarray(data.camera()[:, :120]).convert(
            "RGB"
        ),  # 512×120 (transformers reads gray as 1 channel)
        Image.fromarray(data.chelsea()[:9, :30]),  # 9×30
    ]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_tiny_siglip2(folder, **CONFIGS[request.param])
    theirs = transformers.AutoProcessor.from_pretrained(folder)
    return ref, theirs, mmlm.load(folder)


def test_loads_as_a_naflex_dual_encoder(pair):
    _, _, m = pair
    assert isinstance(m, ContrastiveModel) and isinstance(m.image_processor, NaFlexProcessor)
    assert m.config.vision.stem == "linear" and m.config.vision.positions == "naflex"


def test_patches_mask_and_grids_equal_transformers(pair):
    _, theirs, m = pair
    expected = theirs.image_processor(photos(), return_tensors="pt")
    ours = m.image_processor(photos())
    assert torch.equal(ours.shapes, expected["spatial_shapes"])
    assert torch.equal(ours.mask, expected["pixel_attention_mask"].bool())
    assert len({tuple(s) for s in ours.shapes.tolist()}) == 4  # four different grids in one batch
    torch.testing.assert_close(ours.patches, expected["pixel_values"], atol=1e-6, rtol=0)


def test_embeddings_and_logits_equal_transformers(pair):
    ref, theirs, m = pair
    texts = ["an astronaut", "a cup of coffee", "a camera", "a cat"]  # within 16 tokens: no truncation
    # each half on its own: Siglip2Processor's call would put its defaults (16-px patches, 256) over the folder's
    inputs = {**theirs.image_processor(photos(), return_tensors="pt"),
              **theirs.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")}  # fmt: skip
    with torch.no_grad():
        out = ref(**inputs)
    image_emb, text_emb = m.encode_image(photos()), m.encode_text(texts)
    torch.testing.assert_close(image_emb, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_emb, out.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.logits(image_emb, text_emb), out.logits_per_image, atol=1e-4, rtol=0)


def test_an_image_alone_embeds_as_in_a_padded_batch(pair):
    # the padding of a batch is masked out: an image's embedding does not depend on its batch mates
    _, _, m = pair
    alone = torch.cat([m.encode_image([p]) for p in photos()])
    torch.testing.assert_close(alone, m.encode_image(photos()), atol=1e-5, rtol=0)


def test_export_loads_in_transformers_with_equal_embeddings(pair, tmp_path):
    _, _, m = pair
    m.save_pretrained(tmp_path)
    again = transformers.Siglip2Model.from_pretrained(tmp_path).eval()
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path)
    inputs = theirs.image_processor(photos()[:2], return_tensors="pt")
    with torch.no_grad():
        expected = again.get_image_features(**inputs).pooler_output
    torch.testing.assert_close(m.encode_image(photos()[:2]), torch.nn.functional.normalize(expected, dim=-1),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert isinstance(mmlm.load(tmp_path).image_processor, NaFlexProcessor)


@pytest.mark.parametrize(("height", "width"), [(512, 512), (400, 600), (9, 30), (1, 1000), (37, 41)])
def test_resize_fits_the_budget_as_transformers_does(height, width):
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    for patch, budget in [(16, 256), (4, 24), (14, 729)]:
        ours = size_for_max_patches(height, width, patch, budget)
        assert ours == get_image_size_for_max_num_patches(height, width, patch, budget)
        assert (ours[0] // patch) * (ours[1] // patch) <= budget


def test_a_tower_for_patches_refuses_an_image_batch(pair):
    _, _, m = pair
    with pytest.raises(InputError, match=r"^this tower reads NaFlex patches \(a PatchBatch\), not a"):
        m.model.encode_image(torch.zeros(1, 3, 16, 16))


def test_bad_processor_settings_are_one_line():
    with pytest.raises(InputError, match=r"^Siglip2ImageProcessor config: unknown keys \['max_patches'\]$"):
        NaFlexProcessor.from_hf({"image_processor_type": "Siglip2ImageProcessor", "max_patches": 64})
    with pytest.raises(InputError, match=r"^patch_size and max_num_patches: got 16 and 0; expected ≥ 1$"):
        NaFlexProcessor(16, 0)
    unresized = NaFlexProcessor(4, 8, do_resize=False)
    with pytest.raises(
        InputError, match=r"^image of 40x40 gives a 10x10 patch grid; expected 1 to 8 patches"
    ):
        unresized([Image.fromarray(np.zeros((40, 40, 3), np.uint8))])


def test_similarity_and_index_run_on_a_naflex_model(pair, tmp_path, capsys):
    from mmlm.cli import main

    _, _, m = pair
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, photo in zip(["astronaut", "coffee", "camera", "cat"], photos(), strict=True):
        photo.save(folder / f"{name}.png")
    model = str(tmp_path / "model")
    m.save_pretrained(model)
    argv = ["similarity", "--model", model, "--image", str(folder / "coffee.png"), "--text", "a cup of coffee",
            "--text", "a cat", "--json"]  # fmt: skip
    assert main(argv) == 0
    scores = json.loads(capsys.readouterr().out)[0]["scores"]
    expected = m.similarity([folder / "coffee.png"], ["a cup of coffee", "a cat"])[0]
    assert [scores["a cup of coffee"], scores["a cat"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert (
        main(["index", "build", "--model", model, "--images", str(folder), "--index", str(tmp_path / "i")])
        == 0
    )
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "i"), "--image", str(folder / "cat.png"), "-k", "1",
                 "--json"]) == 0  # fmt: skip
    assert "cat.png" in capsys.readouterr().out  # an image's nearest neighbour is itself


def test_a_fixed_resolution_siglip2_folder_masks_its_padding_as_transformers(tmp_path):
    # google/siglip2-*-224 style: a SiglipModel (model_type "siglip") with SigLIP 2's Gemma tokenizer, whose
    # attention mask transformers passes on; SigLIP's own tokenizer_config.json asks for input_ids alone
    _, vocab = write_siglip2_tokenizer(tmp_path)
    torch.manual_seed(0)
    ref = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
    )).eval()  # fmt: skip
    ref.save_pretrained(tmp_path)
    texts = ["a cat", "a cup of coffee"]
    inputs = transformers.AutoTokenizer.from_pretrained(tmp_path)(
        texts, padding="max_length", max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        expected = torch.nn.functional.normalize(ref.get_text_features(**inputs).pooler_output, dim=-1)
    m = mmlm.load(tmp_path)
    assert m.config.text.mask_padding
    torch.testing.assert_close(m.encode_text(texts), expected, atol=1e-5, rtol=0)
