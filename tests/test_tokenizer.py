"""Our tokenisers give the ids transformers' CLIP and SigLIP tokenizers give, on tiny offline vocabularies."""

import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPTokenizer, SiglipTokenizer

from fixtures_text import write_clip_tokenizer, write_siglip_tokenizer
from mmlm.errors import InputError
from mmlm.processing.tokenizer import HFTokenizer, SentencePieceTokenizer, TextTokenizer, load_tokenizer

LONG = " ".join(["zebras jumping across the river at night"] * 20)
TEXTS = [
    "a photo of a cat",
    "",
    "A PHOTO of a Dog!",
    "naïve café — 東京 🐱",
    "don't stop, it's fine...",
    "  extra   spaces\tand\nnewlines  ",
    "numbers 12345 and 3.14",
    LONG,
    "hello,world;(brackets) [and] {braces}",
    "Ünïcödé ÉÈ x▁y",
    "<|endoftext|> inside <|startoftext|>text",
    "a </s> b <unk> c",
    "</s> starts with the end token",
    "\u0301 </s>  </s>x",
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip"))[0]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return write_siglip_tokenizer(tmp_path_factory.mktemp("siglip"))[0]


def reference_ids(reference, padding: str, context_length: int) -> list[list[int]]:
    # CLIPProcessor / SiglipProcessor forward text kwargs to the tokenizer unchanged.
    padding = True if padding == "longest" else padding
    return reference(TEXTS, padding=padding, truncation=True, max_length=context_length)["input_ids"]


@pytest.mark.parametrize("padding", ["longest", "max_length"])
@pytest.mark.parametrize("context_length", [None, 12])
def test_clip_ids_match_transformers(clip_dir, padding, context_length):
    ours = load_tokenizer(clip_dir, context_length, padding)
    assert isinstance(ours, HFTokenizer)
    ids = ours(TEXTS)
    assert ids.dtype == torch.long
    assert ids.tolist() == reference_ids(
        AutoTokenizer.from_pretrained(clip_dir), padding, ours.context_length
    )


def test_clip_special_tokens_come_from_the_checkpoint(tmp_path, clip_dir):
    ours = load_tokenizer(clip_dir)
    reference = CLIPTokenizer.from_pretrained(clip_dir)
    assert (ours.context_length, ours.eos_id, ours.pad_id, ours.bos_id) == (77, 663, 663, 662)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (
        reference.eos_token_id,
        reference.pad_token_id,
        reference.bos_token_id,
    )
    assert ours.vocab_size == len(reference)

    # Some laion checkpoints pad with "!" (id 0) instead of <|endoftext|>.
    bang_dir, _ = write_clip_tokenizer(tmp_path / "bang", pad_token="!")
    bang = load_tokenizer(bang_dir)
    assert bang.pad_id == 0
    assert bang(TEXTS).tolist() == reference_ids(AutoTokenizer.from_pretrained(bang_dir), "longest", 77)


def test_padding_side_comes_from_the_config(tmp_path, clip_dir):
    left = load_tokenizer(clip_dir).save(tmp_path / "left")
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    ids = load_tokenizer(left)(TEXTS)
    assert ids[1, 0] == 663  # the empty caption, [bos, eos], sits at the right end
    assert ids.tolist() == reference_ids(AutoTokenizer.from_pretrained(left), "longest", 77)


def test_clip_truncation_keeps_bos_and_eos(clip_dir):
    ids = load_tokenizer(clip_dir, context_length=8)([LONG, "a cat"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == 662 and ids[0, -1] == 663 and (ids[0, 1:-1] < 662).all()
    short = load_tokenizer(clip_dir)(["a cat"])[0].tolist()
    assert short[0] == 662 and short[-1] == 663
    assert ids[1].tolist() == short + [663] * (8 - len(short))


@pytest.mark.parametrize("context_length", [None, 16])
def test_siglip_ids_match_transformers(siglip_dir, context_length):
    ours = load_tokenizer(siglip_dir, context_length)
    assert isinstance(ours, SentencePieceTokenizer)
    assert ours.padding == "max_length"
    ids = ours(TEXTS).tolist()
    assert ids == reference_ids(
        SiglipTokenizer(vocab_file=str(siglip_dir / "spiece.model")), "max_length", len(ids[0])
    )
    assert ids == reference_ids(AutoTokenizer.from_pretrained(siglip_dir), "max_length", ours.context_length)


def test_siglip_longest_padding_matches_transformers(siglip_dir):
    ours = load_tokenizer(siglip_dir, padding="longest")
    assert ours(TEXTS).tolist() == reference_ids(AutoTokenizer.from_pretrained(siglip_dir), "longest", 64)


def test_siglip_canonicalises_case_punctuation_and_spaces(siglip_dir):
    ours = load_tokenizer(siglip_dir)
    assert ours.canonicalize("  A Photo,  of\tTHE (red) car!! ") == "a photo of the red car"
    ids = ours(["A Photo,  of\tTHE (red) car!!", "a photo of the red car"])
    assert torch.equal(ids[0], ids[1])
    assert (ours.context_length, ours.eos_id, ours.pad_id, ours.vocab_size) == (64, 1, 1, 128)


def test_siglip_truncation_keeps_eos(siglip_dir):
    ids = load_tokenizer(siglip_dir, context_length=10)([LONG, ""])
    assert ids.shape == (2, 10)
    assert ids[0, -1] == 1 and (ids[0, :-1] != 1).all()
    assert ids[1].tolist() == [1] * 10  # an empty caption is just </s>, then padding (also </s>)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_save_round_trips_through_transformers(tmp_path, clip_dir, siglip_dir, which):
    source = clip_dir if which == "clip" else siglip_dir
    ours = load_tokenizer(source, padding="max_length")
    saved = ours.save(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(saved)
    assert type(reloaded) is type(AutoTokenizer.from_pretrained(source))
    assert ours(TEXTS).tolist() == reference_ids(reloaded, "max_length", ours.context_length)
    assert torch.equal(load_tokenizer(saved, padding="max_length")(TEXTS), ours(TEXTS))


def test_both_tokenizers_satisfy_the_protocol(clip_dir, siglip_dir):
    assert isinstance(load_tokenizer(clip_dir), TextTokenizer)
    assert isinstance(load_tokenizer(siglip_dir), TextTokenizer)


def test_siglip_checkpoint_with_a_tokenizer_json_still_uses_spiece(tmp_path, clip_dir, siglip_dir):
    both = load_tokenizer(siglip_dir).save(tmp_path / "both")
    load_tokenizer(clip_dir).save(tmp_path / "clip_json")
    (both / "tokenizer.json").write_bytes((tmp_path / "clip_json" / "tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)


def test_empty_or_non_text_input_is_rejected(clip_dir, siglip_dir):
    for tokenizer in (load_tokenizer(clip_dir), load_tokenizer(siglip_dir)):
        with pytest.raises(InputError, match="at least one text"):
            tokenizer([])
        with pytest.raises(InputError, match="list of strings"):
            tokenizer("a single string")
        with pytest.raises(InputError, match=r"texts\[1\]"):
            tokenizer(["fine", 3])


def test_bad_folders_and_options_are_rejected(tmp_path, clip_dir):
    with pytest.raises(InputError, match=f"{tmp_path}.*tokenizer.json or spiece.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="padding"):
        load_tokenizer(clip_dir, padding="do_not_pad")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "broken_spiece"
    broken.mkdir()
    (broken / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match="spiece.model"):
        load_tokenizer(broken)
    config = json.loads((clip_dir / "tokenizer_config.json").read_text())
    unlimited = tmp_path / "unlimited"
    load_tokenizer(clip_dir).save(unlimited)
    (unlimited / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": int(1e30)}))
    with pytest.raises(InputError, match="context_length"):
        load_tokenizer(unlimited)
