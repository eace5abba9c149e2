"""Streaming conversations for `mmlm train vlm`: records read lazily, samples encoded in DataLoader workers, bad
samples skipped and counted by reason, exact resume with workers, and one-line errors for hopeless data."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from mmlm.cli import main
from mmlm.data.conversation_records import ConversationRecords, SampleSkipped, encode_record
from mmlm.processing.image import PixelNormalize
from mmlm.processing.vlm_processor import VLMProcessor
from mmlm.train.mixed_batches import DataWorkerError, MixedBatches, device_batch, worker_failures_as_errors
from mmlm.train.mixing import MULTIMODAL, EncodedSource, MixingSampler
from mmlm.train.vlm_config import vlm_config_from_dict
from mmlm.train.vlm_loop import build_tokenizer, build_vlm, run_vlm_training

TINY_MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
}
PHOTOS = {"astronaut": (48, 64), "coffee": (40, 40), "chelsea": (64, 36), "camera": (32, 50)}  # (w, h)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)


def record(image: str | list[str], question: str, answer: str) -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]}  # fmt: skip


def write_dataset(folder: Path, bad: bool = True) -> Path:
    """A JSONL file of 20 good records over four photographs, and (if `bad`) one of each kind of bad record."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in PHOTOS.items():
        image = np.asarray(getattr(photos, name)())
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image
        Image.fromarray(image).resize(size).save(folder / f"{name}.jpg")
    rows = [record(f"{name}.jpg", f"what is photo {i}?", f"it is the {name}")
            for i in range(5) for name in PHOTOS]  # fmt: skip
    if bad:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        rows[3] = record("nowhere.jpg", "what is this?", "nothing")  # missing_image
        rows[7] = record("broken.jpg", "what is this?", "nothing")  # corrupt_image
        rows[11] = {
            **record("coffee.jpg", "what?", "a cup"),
            "image": [],
        }  # placeholders: 1 <image>, 0 images
        rows[15] = record("coffee.jpg", "what is this? " + "very " * 200, "a cup")  # too_long
    path = folder / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(out: Path, source: Path, **settings):
    stage = {"steps": 6, "train": ["connector", "lm"], "data": {"source": str(source)}}
    return vlm_config_from_dict({
        "model": TINY_MODEL, "stages": {"instruct": stage}, "batch_size": 4, "max_length": 64, "log_every": 1,
        "eval_samples": 0, "out_dir": str(out), "device": "cpu", **settings})  # fmt: skip


def test_records_are_read_lazily_and_bad_ones_skipped_by_reason(tmp_path):
    path = write_dataset(tmp_path)
    records = ConversationRecords(path)
    assert len(records) == 20 and records.records is None and len(records.offsets) == 20
    cfg = config(tmp_path / "run", path)
    _, processor = build_vlm(cfg, build_tokenizer(cfg, tmp_path / "run", lambda: ["what is the photo"] * 50))
    reasons = {}
    for index in range(len(records)):
        try:
            sample = encode_record(processor, records, index)
            assert sample.pixel_values.shape == (1, 3, 32, 32)
        except SampleSkipped as skip:
            reasons[index] = skip.reason
    assert reasons == {3: "missing_image", 7: "corrupt_image", 11: "placeholders", 15: "too_long"}


def test_stopped_and_resumed_run_with_two_workers_equals_the_straight_run(tmp_path):
    path = write_dataset(tmp_path / "data")
    straight = config(tmp_path / "straight", path, checkpoint_every=2, data={"workers": 2})
    run_vlm_training(straight)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    tokenizer = str(tmp_path / "straight" / "tokenizer")
    resumed = config(
        tmp_path / "resumed", path, data={"workers": 2}, model={**TINY_MODEL, "tokenizer": tokenizer}
    )
    _, records = run_vlm_training(resumed, resume=str(tmp_path / "straight" / "checkpoints" / "step-0000002"))
    assert [r["step"] for r in records] == list(range(1, 7))  # the checkpoint's records, then steps 3..6
    assert [r["loss"] for r in records] == [r["loss"] for r in lines]
    # 24 draws over 20 records: each bad record was drawn at least once, and counts survive the resume
    skips = {k: v for k, v in lines[-1].items() if k.startswith("skipped_")}
    assert set(skips) == {"skipped_missing_image", "skipped_corrupt_image", "skipped_placeholders",
                          "skipped_too_long"}  # fmt: skip
    assert {k: v for k, v in records[-1].items() if k.startswith("skipped_")} == skips


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")
def test_same_batches_with_any_number_of_workers(tmp_path):
    path = write_dataset(tmp_path)
    cfg = config(tmp_path / "run", path)
    _, processor = build_vlm(cfg, build_tokenizer(cfg, tmp_path / "run", lambda: ["what is the photo"] * 50))
    records = ConversationRecords(path)
    source = EncodedSource(len(records), lambda i: encode_record(processor, records, i))

    def first(workers: int, n: int = 5) -> list:
        stream = MixedBatches(
            {MULTIMODAL: source}, MixingSampler({MULTIMODAL: 20}, 1.0, 4, 0), processor, workers
        )
        return [b["input_ids"].tolist() for b, _ in zip(stream, range(n), strict=False)]

    assert first(0) == first(2) == first(3)


def test_every_sample_bad_stops_with_one_line(tmp_path, capsys):
    path = write_dataset(tmp_path / "data", bad=False)
    path.write_text(path.read_text().replace(".jpg", ".png"))  # every image is missing
    cfg = tmp_path / "train.json"
    stage = {"steps": 3, "train": ["connector"], "data": {"source": str(path)}}
    cfg.write_text(json.dumps({"model": TINY_MODEL, "stages": {"s": stage}, "batch_size": 4, "max_length": 64,
                               "eval_samples": 0, "device": "cpu"}))  # fmt: skip
    assert main(["train", "vlm", "--config", str(cfg), f"out_dir={tmp_path / 'run'}", "data.workers=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == "mmlm: error: data: the last 20 batches lost every sample (skipped so far: missing_image 80)"
    )


def _die(index: int) -> None:
    if index == 5:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(tmp_path):
    path = write_dataset(tmp_path)
    cfg = config(tmp_path / "run", path)
    _, processor = build_vlm(cfg, build_tokenizer(cfg, tmp_path / "run", lambda: ["what is the photo"] * 50))
    records = ConversationRecords(path)
    source = EncodedSource(20, lambda i: (_die(i), encode_record(processor, records, i))[1])
    stream = MixedBatches({MULTIMODAL: source}, MixingSampler({MULTIMODAL: 20}, 1.0, 4, 0), processor, 2, 60)
    # the death may surface inside next() or, through the DataLoader's SIGCHLD handler, in the loop's body: the
    # trainer wraps its whole loop, as here
    expected = r"^data: a loader worker failed \(DataLoader worker \(pid"
    with pytest.raises(DataWorkerError, match=expected), worker_failures_as_errors():
        for _ in stream:
            pass


def test_streamed_uint8_pixels_normalised_on_the_device_equal_the_float_path(tmp_path):
    path = write_dataset(tmp_path)
    cfg = config(tmp_path / "run", path)
    _, processor = build_vlm(cfg, build_tokenizer(cfg, tmp_path / "run", lambda: ["what is the photo"] * 50))
    streamed = processor.with_uint8_pixels()
    assert streamed.uint8_pixels and not processor.uint8_pixels  # inference keeps its float pixels
    records = ConversationRecords(path)

    def first(processor, n: int = 3) -> list:
        source = EncodedSource(len(records), lambda i: encode_record(processor, records, i))
        stream = MixedBatches({MULTIMODAL: source}, MixingSampler({MULTIMODAL: 20}, 1.0, 4, 0), processor, 2)
        return [b["pixel_values"] for b, _ in zip(stream, range(n), strict=False)]

    normalize = PixelNormalize(processor.image_processor)
    for small, full in zip(first(streamed), first(processor), strict=True):
        assert small.dtype == torch.uint8 and full.dtype == torch.float32 and small.shape == full.shape
        assert small.untyped_storage().nbytes() * 4 == full.untyped_storage().nbytes()
        on_device = device_batch({"pixel_values": small}, torch.device("cpu"), normalize)["pixel_values"]
        torch.testing.assert_close(on_device, full, atol=1e-6, rtol=0)


def test_a_run_on_uint8_pixels_logs_the_losses_of_float_pixels(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "data", bad=False)
    _, uint8_records = run_vlm_training(config(tmp_path / "uint8", path))
    monkeypatch.setattr(VLMProcessor, "with_uint8_pixels", lambda self: self)  # the float path, as before
    _, float_records = run_vlm_training(config(tmp_path / "float", path))
    assert len(uint8_records) == 6
    for a, b in zip(uint8_records, float_records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0)
