"""Length-grouped and packed batches for `mmlm train vlm`: packing changes no sample's logits, loss or gradient
(a block-diagonal causal mask, positions restarting per sample, no label across samples), length groups put
similar samples together, and both resume exactly."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from mmlm.errors import InputError
from mmlm.models.decoder_lm import build_attention_mask
from mmlm.processing.packing import pack_rows, pack_samples
from mmlm.train.length_grouping import group_by_length
from mmlm.train.mixed_batches import MixedBatches
from mmlm.train.mixing import MULTIMODAL, TEXT, EncodedSource, MixingSampler
from mmlm.train.vlm_config import vlm_config_from_dict
from mmlm.train.vlm_loop import RowLosses, batch_loss, build_tokenizer, build_vlm, run_vlm_training

TINY_MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
}
WORDS = [
    "the",
    "red",
    "square",
    "sits",
    "left",
    "of",
    "a",
    "small",
    "blue",
    "circle",
    "near",
    "the",
    "green",
    "triangle",
]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A tiny fresh VLM in float64 and its processor (max_length 96)."""
    out = tmp_path_factory.mktemp("run")
    cfg = vlm_config_from_dict({"model": TINY_MODEL, "max_length": 96, "out_dir": str(out), "device": "cpu"})
    model, processor = build_vlm(cfg, build_tokenizer(cfg, out, lambda: [" ".join(WORDS)] * 50))
    return model.double(), processor


def encoded(processor, count: int, seed: int = 0) -> list:
    """`count` samples of skewed lengths: photographs with a question and an answer of 1 to 40 words, and
    text-only ones."""
    rng = np.random.default_rng(seed)
    images = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.camera()]
    samples = []
    for i in range(count):
        answer = " ".join(rng.choice(WORDS, size=int(rng.choice([1, 2, 3, 40]))))
        if i % 3 == 2:  # text-only
            samples.append(processor.encode("", answer=answer))
            continue
        image = images[i % len(images)][: 300 + 40 * i, : 200 + 60 * i]  # several sizes and aspect ratios
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is here?"}]},
                    {"role": "assistant", "content": answer}]  # fmt: skip
        samples.append(processor.encode(messages, [Image.fromarray(image).convert("RGB")]))
    return [s for s in samples if s is not None]


KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "audio_features", "image_frames", "image_sizes",
        "position_ids", "segment_ids", "sample_index")  # fmt: skip


def forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = batch["pixel_values"]
    batch = {**batch, "pixel_values": None if pixels is None else pixels.double()}
    return RowLosses(model)(*(batch.get(k) for k in KEYS))


def test_pack_rows_fills_rows_first_fit_decreasing_and_rejects_a_sample_too_long():
    rows = pack_rows([5, 9, 2, 7, 3, 1], 10)
    assert rows == [[1, 5], [3, 4], [0, 2]]  # 9+1, 7+3, 5+2
    with pytest.raises(InputError, match=r"^packing: a sample of 11 tokens does not fit in a row of 10$"):
        pack_rows([3, 11], 10)


def test_segment_mask_is_block_diagonal_and_causal():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask, is_causal = build_attention_mask(None, 0, 6, None, torch.device("cpu"), segment_ids=segments)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert not is_causal and torch.equal(mask[0, 0], expected)


def test_packed_batch_keeps_samples_whole_with_positions_from_zero_and_no_label_across(vlm):
    model, processor = vlm
    samples = encoded(processor, 9)
    batch = pack_samples(processor, samples, 96)
    assert len(batch["input_ids"]) < len(samples)  # packing saved rows
    order = batch["packed_order"].tolist()
    assert sorted(order) == list(range(len(samples)))
    for n, i in enumerate(order):
        where = batch["sample_index"] == n
        row = int(where.nonzero()[0, 0])
        assert where.sum(1)[row] == len(samples[i].input_ids) == where.sum()  # whole, in one row
        assert torch.equal(batch["input_ids"][where], samples[i].input_ids)
        assert torch.equal(batch["position_ids"][where], torch.arange(len(samples[i].input_ids)))
        labels = batch["labels"][where]
        assert labels[0] == -100 and torch.equal(labels[1:], samples[i].labels[1:])
    image_slots = (batch["input_ids"] == model.cfg.image_token_id).sum()
    assert image_slots == batch["images_per_sample"].sum() * model.image_tokens


def test_packed_loss_and_gradients_equal_the_unpacked_batch(vlm):
    model, processor = vlm
    samples = encoded(processor, 9)
    results = {}
    for name, batch in (("padded", processor.collate(samples, "right")),
                        ("packed", pack_samples(processor, samples, 96))):  # fmt: skip
        model.zero_grad(set_to_none=True)
        sample_loss, sample_tokens = forward(model, batch)
        if name == "packed":  # back to the samples' order
            back = torch.empty_like(batch["packed_order"])
            back[batch["packed_order"]] = torch.arange(len(back))
            sample_loss, sample_tokens = sample_loss[back], sample_tokens[back]
        loss = batch_loss(sample_loss, sample_tokens)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[name] = (sample_loss.detach(), sample_tokens, loss.detach(), grads)
    (pad_rows, pad_tokens, pad_loss, pad_grads), (pk_rows, pk_tokens, pk_loss, pk_grads) = results.values()
    assert torch.equal(pad_tokens, pk_tokens)
    # the cross-entropy runs in float32 (causal_lm_loss), the model in float64
    torch.testing.assert_close(pk_rows, pad_rows, rtol=1e-6, atol=0)
    assert abs(float(pk_loss - pad_loss)) < 1e-6
    assert set(pk_grads) == set(pad_grads) and any(k.startswith("connector.") for k in pk_grads)
    for key, grad in pad_grads.items():
        torch.testing.assert_close(pk_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_each_sample_of_a_packed_row_has_the_logits_it_has_alone(vlm):
    model, processor = vlm
    samples = encoded(processor, 6, seed=1)
    batch = pack_samples(processor, samples, 96)
    with torch.no_grad():
        embeds, _ = model.prepare(batch["input_ids"], batch["pixel_values"].double())
        packed = model.run_lm(
            embeds, position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
        ).logits
        for n, i in enumerate(batch["packed_order"].tolist()):
            pixels = samples[i].pixel_values
            alone = model(samples[i].input_ids[None], None if pixels is None else pixels.double()).logits[0]
            torch.testing.assert_close(packed[batch["sample_index"] == n], alone, rtol=0, atol=1e-10)


def test_length_groups_are_sorted_parts_in_a_seeded_order():
    lengths = [30, 5, 12, 40, 7, 22, 9, 3]
    parts = group_by_length(lengths, 4, seed=7, position=0)
    assert sorted(i for part in parts for i in part) == list(range(8))
    assert sorted(sorted(lengths[i] for i in part) for part in parts) == [[3, 5], [7, 9], [12, 22], [30, 40]]
    assert parts == group_by_length(lengths, 4, seed=7, position=0)
    assert {str(group_by_length(lengths, 4, seed=7, position=p)) for p in range(8)} != {str(parts)}


def stream(processor, samples: list, groups: int, pack: bool) -> MixedBatches:
    sources = {MULTIMODAL: EncodedSource(len(samples), lambda i: samples[i]),
               TEXT: EncodedSource(len(samples), lambda i: samples[-1 - i])}  # fmt: skip
    sampler = MixingSampler({MULTIMODAL: len(samples), TEXT: len(samples)}, 0.5, 4 * groups, seed=3)
    return MixedBatches(sources, sampler, processor, 0, 0, groups, pack)


@pytest.mark.parametrize("pack", [False, True])
def test_length_grouped_stream_pads_less_and_resumes_inside_a_pool(vlm, pack):
    _, processor = vlm
    samples = encoded(processor, 12)
    plain = [
        b["attention_mask"].numel()
        for b, _ in zip(stream(processor, samples, 1, False), range(12), strict=False)
    ]
    grouped_stream = stream(processor, samples, 4, pack)
    straight, state = [], None
    for batch, step in zip(grouped_stream, range(12), strict=False):
        straight.append(batch)
        if step == 5:  # inside the second pool of 4 batches
            state = grouped_stream.state_dict()
    assert state["part"] == 2 and state["position"] == 1
    assert sum(b["attention_mask"].numel() for b in straight) < 0.85 * sum(
        plain
    )  # padded slots saved (0.82 here)
    resumed = stream(processor, samples, 4, pack)
    resumed.load_state_dict(state)
    again = [b for b, _ in zip(resumed, range(6), strict=False)]
    assert [b["input_ids"].tolist() for b in again] == [b["input_ids"].tolist() for b in straight[6:]]


def test_bad_packing_settings_name_the_field(tmp_path):
    with pytest.raises(
        InputError, match=r"^data.group_by_length: expected batches per pool, an integer >= 1, got 0$"
    ):
        vlm_config_from_dict({"data": {"group_by_length": 0}, "out_dir": str(tmp_path)})
    with pytest.raises(InputError, match=r"^data.pack: expected true or false, got 'yes'$"):
        vlm_config_from_dict({"data": {"pack": "yes"}, "out_dir": str(tmp_path)})


def test_packed_grouped_run_with_workers_resumed_inside_a_pool_equals_the_straight_run(tmp_path, monkeypatch):
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)
    stage = {
        "steps": 5,
        "train": ["connector", "lm"],
        "data": {"samples": 32, "multimodal_fraction": 0.5, "text_source": "shapes", "text_samples": 32},
    }
    data = {"workers": 2, "group_by_length": 2, "pack": True}

    def run(out, **settings):
        return vlm_config_from_dict({
            "model": {**TINY_MODEL, **settings.pop("model", {})}, "stages": {"instruct": stage}, "batch_size": 4,
            "max_length": 64, "log_every": 1, "eval_samples": 0, "out_dir": str(out), "device": "cpu",
            "data": data, **settings})  # fmt: skip

    _, straight = run_vlm_training(run(tmp_path / "straight", checkpoint_every=3))
    tokenizer = str(tmp_path / "straight" / "tokenizer")
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-0000003"  # the second batch of pool 1 is next
    _, resumed = run_vlm_training(run(tmp_path / "resumed", model={"tokenizer": tokenizer}), str(checkpoint))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert any("loss_image" in r for r in straight) and any("loss_text" in r for r in straight)


def test_packing_a_style_with_per_row_media_is_a_one_line_error(tmp_path):
    model_cfg = {**TINY_MODEL, "connector": {"kind": "cross_attention"}}
    cfg = vlm_config_from_dict(
        {"model": model_cfg, "max_length": 96, "out_dir": str(tmp_path), "device": "cpu"}
    )
    model, processor = build_vlm(cfg, build_tokenizer(cfg, tmp_path, lambda: [" ".join(WORDS)] * 50))
    batch = pack_samples(processor, encoded(processor, 3), 96)
    expected = r"^data.pack: the 'cross_attention' fusion style cannot train on packed rows$"
    with pytest.raises(InputError, match=expected):
        RowLosses(model)(*(batch.get(k) for k in KEYS))
