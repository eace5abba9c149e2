"""`mmlm eval zeroshot|retrieval|probe` end to end on real photographs, against transformers' CLIP as reference."""

import json

import numpy as np
import pytest
import torch
import transformers
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from PIL import Image
from skimage import data
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score

from fixtures_models import write_tiny_clip
from mmlm.cli import main

PHOTOS = {"astronaut": data.astronaut, "cat": data.chelsea, "coffee_cup": data.coffee, "rocket": data.rocket}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP folder, a class-per-folder image tree and the same images as a JSONL manifest."""
    root = tmp_path_factory.mktemp("eval")
    ref = write_tiny_clip(root / "model")
    rows = []
    for name, load in PHOTOS.items():
        photo = Image.fromarray(load()).convert("RGB")
        (root / "images" / name).mkdir(parents=True)
        for i in range(6):  # crops of one photograph per class
            w, h = photo.size
            box = (i * w // 16, i * h // 20, w - i * w // 20, h - i * h // 16)
            path = root / "images" / name / f"{i}.png"
            photo.crop(box).resize((48, 48)).save(path)
            rows.append({"image": f"images/{name}/{i}.png", "label": name})
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ref


def reference_embeddings(folder, ref, images, texts):
    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pixels = torch.tensor(
        np.asarray(processor([Image.open(p) for p in images], return_tensors="np")["pixel_values"])
    )
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    image_emb, text_emb = out.image_embeds, out.text_embeds  # L2-normalised
    return image_emb, text_emb


@pytest.mark.parametrize("source", ["images", "labels.jsonl"])
def test_eval_zeroshot_matches_the_transformers_reference(world, source, capsys):
    root, ref = world
    out = root / f"zs-{source}.json"
    args = ["eval", "zeroshot", "--model", str(root / "model"), "--data", str(root / source)]
    assert main([*args, "--templates", "simple", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "top1" in printed and "mean_per_class_recall" in printed
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the reference: transformers embeddings, CLIP_benchmark's classifier recipe, its metric definitions
    classes = sorted(PHOTOS)
    images = [root / "images" / c / f"{i}.png" for c in classes for i in range(6)]
    labels = torch.tensor([k for k in range(len(classes)) for _ in range(6)])
    from mmlm.eval.templates import SIMPLE_TEMPLATES

    prompts = [t.format(c=c.replace("_", " ")) for c in classes for t in SIMPLE_TEMPLATES]
    image_emb, text_emb = reference_embeddings(root / "model", ref, images, prompts)
    weights = torch.nn.functional.normalize(text_emb.view(len(classes), len(SIMPLE_TEMPLATES), -1), dim=-1)
    weights = torch.nn.functional.normalize(weights.mean(1), dim=-1)
    logits = image_emb @ weights.T
    pred = logits.argmax(1)
    assert result["top1"] == pytest.approx((pred == labels).float().mean().item(), abs=1e-6)
    assert result["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-6)
    assert result["top5"] is None  # four classes
    assert result["num_samples"] == 24 and result["num_classes"] == 4 and result["num_templates"] == 7
    calibration = result["calibration"]
    assert calibration["checkpoint_logit_scale"] == pytest.approx(ref.logit_scale.exp().item(), rel=1e-6)
    assert calibration["fitted_logit_scale"] > 0 and calibration["held_out_samples"] == 12


def test_zero_shot_classifier_matches_clip_benchmarks(world):
    import mmlm

    root, _ = world
    m = mmlm.load(root / "model")

    class Model:  # CLIP_benchmark calls model.encode_text(tokenizer(texts))
        encode_text = m.model.encode_text

    names = ["astronaut", "cat", "coffee cup"]
    from mmlm.eval.templates import OPENAI_IMAGENET_TEMPLATES

    theirs = zeroshot_classification.zero_shot_classifier(
        Model(), m.tokenizer, names, list(OPENAI_IMAGENET_TEMPLATES), "cpu", amp=False
    )
    ours = m.class_embeddings(names, OPENAI_IMAGENET_TEMPLATES)
    torch.testing.assert_close(ours, theirs.T, atol=1e-6, rtol=0)


def test_eval_retrieval_with_several_captions_matches_clip_benchmark(world, capsys):
    root, ref = world
    captions = {
        "astronaut": ["an astronaut in a suit", "a person with a flag"],
        "cat": ["a cat"],
        "coffee_cup": ["a cup of coffee", "coffee on a saucer", "a drink"],
        "rocket": ["a rocket on the pad", "a launch"],
    }
    rows = [{"image": f"images/{c}/{i}.png", "text": captions[c]} for c in sorted(PHOTOS) for i in range(2)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "retrieval.json"
    args = ["eval", "retrieval", "--model", str(root / "model"), "--data", str(root / "pairs.jsonl")]
    assert main([*args, "--out", str(out)]) == 0
    assert "image_to_text" in capsys.readouterr().out
    result = json.loads(out.read_text())

    texts = [t for r in rows for t in r["text"]]
    text_to_image = [i for i, r in enumerate(rows) for _ in r["text"]]
    image_emb, text_emb = reference_embeddings(root / "model", ref, [root / r["image"] for r in rows], texts)
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True
    for k in (1, 5, 10):
        t2i = zeroshot_retrieval.recall_at_k(scores, positive, k=min(k, len(rows)))
        i2t = zeroshot_retrieval.recall_at_k(scores.T, positive.T, k=k)
        assert result[f"text_to_image_R@{k}"] == pytest.approx((t2i > 0).float().mean().item(), abs=1e-6)
        assert result[f"image_to_text_R@{k}"] == pytest.approx((i2t > 0).float().mean().item(), abs=1e-6)
    assert result["num_images"] == 8 and result["num_texts"] == 16


def test_eval_probe_on_digits(world, tmp_path):
    root, _ = world
    digits = load_digits()
    for split, rows in (("train", range(0, 300)), ("test", range(300, 400))):
        for i in rows:
            folder = tmp_path / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 15).astype(np.uint8)).resize((32, 32)).save(
                folder / f"{i}.png"
            )
    out = tmp_path / "probe.json"
    args = ["eval", "probe", "--model", str(root / "model"), "--train", str(tmp_path / "train")]
    assert main([*args, "--test", str(tmp_path / "test"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # even a random tiny ViT's features separate digits well above chance (0.1)
    assert result["top1"] > 0.3 and result["test_samples"] == 100 and result["C"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["eval", "zeroshot", "--data", "{root}/nowhere"], "nowhere not found"),
        (
            ["eval", "zeroshot", "--data", "{root}/images", "--templates", "{root}/labels.jsonl"],
            "no '{}' or '{c}'",
        ),
        (["eval", "zeroshot", "--data", "{root}/bad.jsonl"], "line 1: expected"),
        (["eval", "retrieval", "--data", "{root}/labels.jsonl"], "labels.jsonl"),
        (["eval", "probe", "--train", "{root}/images", "--test", "{root}/nowhere"], "nowhere not found"),
    ],
)
def test_eval_bad_inputs_exit_2_with_one_line(world, extra, message, capsys):
    root, _ = world
    (root / "bad.jsonl").write_text('{"image": "x.png"}\n')
    argv = [a.format(root=root) for a in extra] + ["--model", str(root / "model")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmlm: error:") and message in err and "\n" not in err
