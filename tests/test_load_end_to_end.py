"""mmlm.load on complete transformers folders: text and images in, the same numbers as transformers out."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data

import mmlm
from fixtures_models import write_tiny_clip, write_tiny_siglip

TEXTS = ["a red square", "a blue ocean", "a photo of a dog", "A Photo, of   TWO cats!"]


def photos():
    return [
        Image.fromarray(data.astronaut()),
        Image.fromarray(data.coffee()),
        Image.fromarray(data.chelsea()),
    ]


def reference_features(ref, processor, tokenizer, images, texts, **tok_kwargs):
    pixels = torch.tensor(np.asarray(processor(images, return_tensors="np")["pixel_values"]))
    tokens = tokenizer(texts, return_tensors="pt", **tok_kwargs)
    with torch.no_grad():
        out = ref(input_ids=tokens["input_ids"], pixel_values=pixels)
    return out


def test_clip_folder_matches_transformers_end_to_end(tmp_path):
    ref = write_tiny_clip(tmp_path)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    out = reference_features(ref, processor, tokenizer, photos(), TEXTS, padding=True)
    m = mmlm.load(tmp_path)
    torch.testing.assert_close(m.encode_image(photos()), out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_text(TEXTS), out.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        m.similarity(photos(), TEXTS), out.logits_per_image.softmax(-1), atol=1e-5, rtol=0
    )


def test_siglip_folder_matches_transformers_end_to_end(tmp_path):
    ref = write_tiny_siglip(tmp_path)
    processor = transformers.SiglipImageProcessorPil.from_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    out = reference_features(
        ref, processor, tokenizer, photos(), TEXTS, padding="max_length", truncation=True
    )
    m = mmlm.load(tmp_path)
    torch.testing.assert_close(m.encode_image(photos()), out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_text(TEXTS), out.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        m.similarity(photos(), TEXTS), out.logits_per_image.sigmoid(), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("writer", [write_tiny_clip, write_tiny_siglip])
def test_export_round_trip_loads_in_transformers(tmp_path, writer):
    writer(tmp_path / "src")
    m = mmlm.load(tmp_path / "src")
    m.save_pretrained(tmp_path / "out")
    again = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    pad = "max_length" if writer is write_tiny_siglip else True
    out = reference_features(again, processor, tokenizer, photos(), TEXTS, padding=pad, truncation=True)
    torch.testing.assert_close(m.encode_image(photos()), out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_text(TEXTS), out.text_embeds, atol=1e-5, rtol=0)
    reloaded = mmlm.load(tmp_path / "out")
    torch.testing.assert_close(reloaded.encode_text(TEXTS), m.encode_text(TEXTS), atol=0, rtol=0)


def test_classify_averages_template_embeddings(tmp_path):
    write_tiny_clip(tmp_path)
    m = mmlm.load(tmp_path)
    templates = ["a photo of a {}.", "a drawing of a {c}."]
    probs = m.classify(photos(), ["cat", "coffee", "person"], templates)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    per_class = torch.stack(
        [torch.nn.functional.normalize(m.encode_text([t.replace("{}", c).replace("{c}", c) for t in templates]).mean(0), dim=0)
         for c in ["cat", "coffee", "person"]]
    )  # fmt: skip
    with torch.no_grad():
        expected = (m.model.logit_scale.exp() * m.encode_image(photos()) @ per_class.T).softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


def test_bfloat16_load_stays_close(tmp_path):
    write_tiny_clip(tmp_path)
    fp32, bf16 = mmlm.load(tmp_path), mmlm.load(tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    cos = (fp32.encode_image(photos()) * bf16.encode_image(photos())).sum(-1)
    assert cos.min() > 0.99


def test_models_transformers_cannot_hold_round_trip_in_mmlm_format(tmp_path):
    from fixtures_text import write_clip_tokenizer
    from mmlm.inference.contrastive import ContrastiveModel
    from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
    from mmlm.models.text import TextConfig
    from mmlm.models.vision import VisionConfig
    from mmlm.processing.image import ImageProcessor
    from mmlm.processing.tokenizer import load_tokenizer

    tok_dir, vocab = write_clip_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(tok_dir)
    vision = VisionConfig(
        image_size=32, patch_size=4, width=16, layers=1, heads=2, mlp_dim=32, stem="conv", embed_dim=8
    )
    text = TextConfig(
        vocab_size=vocab, width=16, layers=1, heads=2, mlp_dim=32, embed_dim=8, eos_token_id=tokenizer.eos_id
    )
    model = ContrastiveModel(
        DualEncoder(DualEncoderConfig(vision, text)).eval(), tokenizer, ImageProcessor.clip(32)
    )
    model.save_pretrained(tmp_path / "out")  # a conv stem has no transformers counterpart
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "dual_encoder" and "mmlm_version" in config
    again = mmlm.load(tmp_path / "out")
    torch.testing.assert_close(again.encode_image(photos()), model.encode_image(photos()), atol=0, rtol=0)
    torch.testing.assert_close(again.encode_text(TEXTS), model.encode_text(TEXTS), atol=0, rtol=0)
    config["config"]["vision"]["stem"] = "patch"  # weights that do not fit the config: one clear error
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(mmlm.InputError, match="has no place in the model"):
        mmlm.load(tmp_path / "out")


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    ref = write_tiny_clip(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards and model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(
        list(tmp_path.glob("model-*.safetensors"))
    ) > 1
    processor = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    out = reference_features(ref, processor, tokenizer, photos(), TEXTS, padding=True)
    m = mmlm.load(tmp_path)
    torch.testing.assert_close(m.encode_image(photos()), out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_text(TEXTS), out.text_embeds, atol=1e-5, rtol=0)
