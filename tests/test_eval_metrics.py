"""Evaluation metrics equal CLIP_benchmark's own functions (and scikit-learn's, open_clip's) on shared inputs,
including several captions per image and tied scores; calibration and the linear probe on worked cases."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_benchmark.metrics import zeroshot_retrieval
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion

from mmlm.errors import InputError
from mmlm.eval.calibration import calibration_report, expected_calibration_error, fit_scale, nll
from mmlm.eval.linear_probe import linear_probe
from mmlm.eval.retrieval import retrieval_metrics
from mmlm.eval.templates import OPENAI_IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, read_templates, resolve_templates
from mmlm.eval.zeroshot import confusion_matrix, zero_shot_metrics


def clip_benchmark_retrieval(image_emb, text_emb, text_to_image, ks, batch_size=4):
    """CLIP_benchmark's evaluate() after the embeddings: its recall_at_k through its batchify."""
    scores = text_emb @ image_emb.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        t2i = zeroshot_retrieval.batchify(
            zeroshot_retrieval.recall_at_k, scores, positive, batch_size, "cpu", k=k
        )
        i2t = zeroshot_retrieval.batchify(
            zeroshot_retrieval.recall_at_k, scores.T, positive.T, batch_size, "cpu", k=k
        )
        out[f"text_to_image_R@{k}"] = (t2i > 0).float().mean().item()
        out[f"image_to_text_R@{k}"] = (i2t > 0).float().mean().item()
    return out


def captions_per_image(n_images, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (n_images,), generator=g)
    index = [i for i, c in enumerate(counts.tolist()) for _ in range(c)]
    return [index[j] for j in torch.randperm(len(index), generator=g).tolist()]  # captions shuffled


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_recall_matches_clip_benchmark_with_several_captions(chunk, seed):
    torch.manual_seed(seed)
    text_to_image = captions_per_image(40, seed)
    images = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)
    texts = torch.nn.functional.normalize(
        images[text_to_image] + 0.9 * torch.randn(len(text_to_image), 16), dim=-1
    )
    ours = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk=chunk)
    ref = clip_benchmark_retrieval(images, texts, text_to_image, (1, 5, 10))
    assert {k: ours[k] for k in ref} == pytest.approx(ref, abs=1e-6)  # theirs is a float32 mean
    assert 0 < ours["text_to_image_R@1"] < ours["text_to_image_R@10"] < 1  # a case that can tell them apart


@pytest.mark.parametrize("chunk", [None, 3])
def test_retrieval_ties_break_in_topk_order_like_clip_benchmark(chunk):
    # integer-valued embeddings: every score is exact and many scores tie
    g = torch.Generator().manual_seed(3)
    images = torch.randint(-1, 2, (30, 3), generator=g).float()
    text_to_image = captions_per_image(30, 3)
    texts = torch.randint(-1, 2, (len(text_to_image), 3), generator=g).float()
    scores = texts @ images.T
    assert (scores == scores.max(1, keepdim=True).values).sum(1).float().mean() > 2  # ties at the top
    ours = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5), chunk=chunk)
    ref = clip_benchmark_retrieval(images, texts, text_to_image, (1, 2, 5))
    assert {k: ours[k] for k in ref} == pytest.approx(ref, abs=1e-6)  # one query is 1/30 or 1/87


def test_ranks_follow_the_best_positive_and_open_clip_for_one_caption():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(25, 8), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(25, 8), dim=-1)
    ours = retrieval_metrics(images, texts, list(range(25)), chunk=4)
    for name, logits in (("image_to_text", images @ texts.T), ("text_to_image", texts @ images.T)):
        # open_clip's get_clip_metrics: position of the ground truth in the descending argsort
        preds = torch.where(torch.argsort(logits, descending=True) == torch.arange(25)[:, None])[1].numpy()
        assert ours[f"{name}_mean_rank"] == pytest.approx(preds.mean() + 1)
        assert ours[f"{name}_median_rank"] == np.floor(np.median(preds)) + 1
    # several captions: the rank of an image query is that of its best caption
    text_to_image = [0, 0, 1, 1, 1]
    images = torch.eye(2, 3)
    texts = torch.tensor([[0.0, 1, 0], [0.5, 0, 0.9], [0, 0, 1], [0.2, 0, 0], [0, 1, 0]])
    ours = retrieval_metrics(images, texts, text_to_image, ks=(1, 2))
    # image 0 scores texts [0, .5, 0, .2, 0]: best own caption (text 1) is first; image 1: [1, 0, 0, 0, 1],
    # its captions 2, 3, 4 score 0, 0, 1 and text 0 (not its own) ties with text 4 at 1: rank 1 (ties favour it)
    assert ours["image_to_text_mean_rank"] == 1.0


def test_retrieval_bad_inputs():
    with pytest.raises(InputError, match="entries for 3 texts"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), [0, 1])
    with pytest.raises(InputError, match="image 1 has no caption"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 4), [0, 0])
    with pytest.raises(InputError, match="dims"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 5), [0, 1])


def clip_benchmark_accuracy(output, target, topk):
    """CLIP_benchmark's `accuracy`, whose float() on a one-element array fails under numpy >= 2.4."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("quantised", [False, True])
def test_zero_shot_metrics_match_clip_benchmark(quantised):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 12, generator=g)
    if quantised:
        logits = logits.round()  # many ties, including at the top
    labels = torch.randint(0, 12, (200,), generator=g)
    labels[labels == 11] = 10  # a class absent from the labels, as balanced accuracy must handle
    ours = zero_shot_metrics(logits, labels)
    top1, top5 = clip_benchmark_accuracy(logits, labels, (1, 5))
    assert ours["top1"] == pytest.approx(top1, abs=1e-7)
    assert ours["top5"] == pytest.approx(top5, abs=1e-7)
    ref = balanced_accuracy_score(labels.numpy(), logits.argmax(axis=1).numpy())
    assert ours["mean_per_class_recall"] == pytest.approx(ref, abs=1e-7)


def test_top5_with_fewer_than_five_classes_is_reported_missing():
    out = zero_shot_metrics(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    assert out == {"top1": 0.5, "top5": None, "mean_per_class_recall": 0.5}


def test_confusion_matrix_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    pred, labels = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 6, (300,), generator=g)
    assert (confusion_matrix(pred, labels, 6).numpy() == sk_confusion(labels, pred, labels=range(6))).all()


def test_templates_are_openais_as_clip_benchmark_ships_them():
    import clip_benchmark

    path = Path(clip_benchmark.__file__).parent / "datasets" / "en_zeroshot_classification_templates.json"
    assert list(OPENAI_IMAGENET_TEMPLATES) == json.loads(path.read_text())["imagenet1k"]
    assert set(SIMPLE_TEMPLATES) < set(OPENAI_IMAGENET_TEMPLATES) and len(SIMPLE_TEMPLATES) == 7
    assert resolve_templates("simple") == list(SIMPLE_TEMPLATES)
    assert resolve_templates(None) == list(OPENAI_IMAGENET_TEMPLATES)


def test_templates_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {c}.\n\nart of {}\n")
    assert read_templates(path) == ["a photo of a {c}.", "art of {}"]
    path.write_text("a photo of a {c}.\nno marker here\n")
    with pytest.raises(InputError, match="template 2 'no marker here'"):
        read_templates(path)
    with pytest.raises(InputError, match="expected 'openai', 'simple' or an existing file"):
        resolve_templates(str(tmp_path / "missing.txt"))


def test_ece_worked_example():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.7 (right)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins (0.8667, 0.9333]: acc 0.5, conf 0.9 -> 2/4·0.4; (0.5333, 0.6]: acc 1, conf 0.6 -> 1/4·0.4;
    # (0.6667, 0.7333]: acc 1, conf 0.7 -> 1/4·0.3
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3)


def test_fitted_scale_recovers_the_generating_temperature():
    g = torch.Generator().manual_seed(0)
    cosines = torch.rand(20000, 10, generator=g, dtype=torch.float64) * 0.4
    labels = torch.multinomial(torch.softmax(30.0 * cosines, 1), 1, generator=g).squeeze(1)
    fitted = fit_scale(cosines, labels)
    assert fitted == pytest.approx(30.0, rel=0.05)
    assert nll(cosines, labels, fitted) < min(
        nll(cosines, labels, fitted * 0.98), nll(cosines, labels, fitted * 1.02)
    )
    report = calibration_report(cosines, labels, checkpoint_scale=100.0)
    assert report["held_out_ece_fitted"] < report["held_out_ece_checkpoint"]
    assert report["held_out_nll_fitted"] < report["held_out_nll_checkpoint"]
    assert report["fit_samples"] + report["held_out_samples"] == 20000


def test_linear_probe_on_digits_picks_c_on_validation():
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    out = linear_probe(x[:1200], y[:1200], x[1200:], y[1200:], val_fraction=0.25)
    assert out["top1"] > 0.9 and out["mean_per_class_recall"] > 0.9
    assert out["val_accuracy"] == max(out["sweep"].values())
    assert out["sweep"]["1e-06"] < 0.5  # heavy regularisation underfits: the sweep matters
    assert out["train_samples"] + out["val_samples"] == 1200 and out["test_samples"] == 597
    with pytest.raises(InputError, match="at least two classes"):
        linear_probe(x[:10], torch.zeros(10, dtype=torch.long), x[10:20], y[10:20])
