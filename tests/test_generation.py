"""Text generation: greedy tokens equal to transformers' generate, caches that agree with recomputation and with
each other, batches that agree with single prompts, stop strings, streaming, seeded sampling, bad input."""

import json

import pytest
import torch
import transformers

import mmlm
from fixtures_lm import one_thread, write_tiny_lm  # noqa: F401 (autouse)
from mmlm.inference.generation import (
    GenerationSettings,
    TextStream,
    draw,
    filter_logits,
    generate_ids,
    lm_step,
    merge_batches,
    new_rows,
    prefill,
    step_batch,
    take_tokens,
    trim_padding,
)

PROMPTS = ["a cat sitting on", "the red car parked near the river at night,", "zebras"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder (GQA, untied) loaded by mmlm, and the transformers model it came from."""
    folder = tmp_path_factory.mktemp("llama")
    ref = write_tiny_lm(folder, "llama", eos_token_id=[2, 5])  # two end tokens, as Llama 3 has
    return mmlm.load(folder), ref


def greedy_ids(m, prompt: str, n: int, cache: str = "static") -> list[int]:
    ids, _ = m.encode([prompt])
    return greedy_ids_from(m, ids, n, cache)


def greedy_ids_from(m, ids: torch.Tensor, n: int, cache: str = "static") -> list[int]:
    kv = m.model.new_cache(1, ids.shape[1] + n if cache == "static" else None)
    settings = GenerationSettings(max_new_tokens=n)
    return [t for step in generate_ids(lm_step(m.model), kv, settings, m.eos_token_ids, ids) for _, t in step]


@pytest.mark.parametrize(
    "model_type, overrides",
    [("llama", {}), ("mistral", dict(sliding_window=8)), ("qwen2", dict(tie_word_embeddings=True))],
)
def test_greedy_tokens_equal_transformers_generate(tmp_path, model_type, overrides):
    ref = write_tiny_lm(tmp_path, model_type, **overrides)
    m = mmlm.load(tmp_path)
    for prompt in PROMPTS:
        ids, _ = m.encode([prompt])
        # 40 new tokens run well past Mistral's window of 8
        want = ref.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0)
        want = want[0, ids.shape[1] :].tolist()
        want = want[: want.index(2)] if 2 in want else want  # transformers pads after the end token
        assert greedy_ids(m, prompt, 40) == want


def test_cached_decoding_equals_recomputing_the_whole_sequence(llama):
    m, _ = llama
    ids, _ = m.encode([PROMPTS[1]])
    sequence, recomputed = ids, []
    with torch.no_grad():
        for _ in range(25):
            token = m.model(sequence).logits[0, -1].argmax()
            if token.item() in m.eos_token_ids:
                break
            recomputed.append(token.item())
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
    assert len(recomputed) > 5
    assert greedy_ids(m, PROMPTS[1], 25, "static") == recomputed
    assert greedy_ids(m, PROMPTS[1], 25, "dynamic") == recomputed


def test_static_and_dynamic_caches_give_the_same_logits_step_by_step(llama):
    m, _ = llama
    ids, mask = m.encode(PROMPTS)
    assert mask is not None  # the batch is left-padded
    static, dynamic = m.model.new_cache(3, ids.shape[1] + 4), m.model.new_cache(3)
    with torch.no_grad():
        for step in range(4):
            a = m.model(ids, attention_mask=mask, cache=static, last_only=True).logits
            b = m.model(ids, attention_mask=mask, cache=dynamic, last_only=True).logits
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"step {step}")
            ids = a[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    assert static[0].length == dynamic[0].length == mask.shape[1] - 1  # the last column is for the next token


@pytest.mark.parametrize("rows_times_matrix", [True, False])
def test_decoding_steps_give_transformers_logits(llama, rows_times_matrix, monkeypatch):
    # Decoding runs a few rows at a time, through rows_times_matrix where it pays on the CPU, else F.linear.
    monkeypatch.setattr("mmlm.layers.linear._MEASURED", [rows_times_matrix])
    m, ref = llama
    ids, mask = m.encode(PROMPTS)
    cache = m.model.new_cache(3, ids.shape[1] + 5)
    sequence, seen = ids, mask
    with torch.no_grad():
        for _ in range(5):
            got = m.model(ids, attention_mask=mask, cache=cache, last_only=True).logits[:, -1]
            want = ref(sequence, attention_mask=seen).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            ids = got.argmax(-1, keepdim=True)
            sequence, seen = torch.cat([sequence, ids], 1), torch.cat([seen, torch.ones_like(ids)], 1)
            mask = seen


def test_static_and_dynamic_cache_generate_the_same_text(llama):
    m, _ = llama
    assert m.generate(PROMPTS, 30, cache="static") == m.generate(PROMPTS, 30, cache="dynamic")


def test_decode_layout_generates_the_same_text(llama, tmp_path):
    m, ref = llama  # loaded on CPU, so in the decode layout
    ref.save_pretrained(tmp_path)
    m.tokenizer.save(tmp_path)
    plain = mmlm.load(tmp_path)
    for p in plain.model.parameters():
        p.data = p.data.contiguous()
    assert plain.generate(PROMPTS, 30) == m.generate(PROMPTS, 30)


def test_left_padded_batch_gives_the_same_text_as_one_by_one(llama):
    m, _ = llama
    batch = m.generate(PROMPTS, max_new_tokens=30)
    assert isinstance(batch, list) and len(batch) == 3
    assert batch == [m.generate(p, max_new_tokens=30) for p in PROMPTS]
    assert len({len(text) for text in batch}) > 1  # rows of different lengths: some finished first or later


def test_inputs_embeds_prefill_gives_the_same_tokens_as_ids(llama):
    # How a VLM generates: the prompt goes in as embeddings (image features merged in), then ids.
    m, _ = llama
    ids, mask = m.encode(PROMPTS)
    settings = GenerationSettings(max_new_tokens=20)

    def run(**prompt):
        kv = m.model.new_cache(3, ids.shape[1] + 20)
        return list(
            generate_ids(lm_step(m.model), kv, settings, m.eos_token_ids, attention_mask=mask, **prompt)
        )

    with torch.no_grad():
        embeds = m.model.embed(ids)
    assert run(inputs_embeds=embeds) == run(input_ids=ids)


def test_a_prompt_joining_a_running_batch_gets_its_one_by_one_tokens(llama):
    # The server's continuous batching: a later prompt is prefilled alone, then merged into the running batch
    # with both caches left-padded to the longer one; rows leave as they end and shared padding is cut.
    m, _ = llama
    settings = GenerationSettings(max_new_tokens=16)
    alone = [greedy_ids(m, p, 16, "dynamic") for p in PROMPTS[:2]]
    step = lm_step(m.model)

    def start(prompt, key):
        ids, mask = m.encode([prompt])
        [row] = new_rows(settings, m.eos_token_ids, 1, ids.device, keys=[key])
        batch, logits = prefill(step, m.model.new_cache(1), [row], ids, None, mask)
        take_tokens(batch, logits)
        return batch, row

    with torch.inference_mode():
        batch, first = start(PROMPTS[0], 0)
        for _ in range(3):
            take_tokens(batch, step_batch(step, batch))
        joining, second = start(PROMPTS[1], 1)
        batch = merge_batches(batch, joining)
        assert batch.mask is not None and batch.mask.shape[0] == 2  # the shorter cache got left padding
        while batch.running:
            take_tokens(batch, step_batch(step, batch))
            trim_padding(batch)
    assert [first.tokens, second.tokens] == alone
    assert first.finish_reason in ("stop", "length") and second.finish_reason in ("stop", "length")


def test_stop_strings_end_each_sequence_before_them(llama):
    m, _ = llama
    full = m.generate(PROMPTS, max_new_tokens=30)
    stop = full[1][10:13]  # three characters from the middle of the second output
    cut = m.generate(PROMPTS, max_new_tokens=30, stop=[stop])
    for text, whole in zip(cut, full, strict=True):
        at = whole.find(stop)
        assert text == (whole if at < 0 else whole[:at])
    assert cut[1] == full[1][: full[1].find(stop)]
    assert m.generate(PROMPTS[1], max_new_tokens=30, stop=["no such text", stop]) == cut[1]


def test_stream_pieces_join_to_the_generated_text(llama):
    m, _ = llama
    for prompt in PROMPTS:
        pieces = list(m.stream(prompt, max_new_tokens=40))
        assert len(pieces) > 3
        assert "".join(pieces) == m.generate(prompt, max_new_tokens=40)
    full = m.generate(PROMPTS[0], max_new_tokens=40)
    stop = full[8:11]
    assert "".join(m.stream(PROMPTS[0], max_new_tokens=40, stop=[stop])) == full[: full.find(stop)]


def test_text_stream_waits_for_whole_characters_and_possible_stop_strings():
    # A byte-level "tokenizer": each token is one byte; "é" is two bytes and "🙂" four.
    def decode(tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")

    stream = TextStream(decode, stop=["END"])
    pieces = [stream.push(b) for b in "é🙂 xEN".encode()]
    assert pieces == ["", "é", "", "", "", "🙂", " ", "x", "", ""]  # "EN" may still become "END"
    assert stream.push(ord("D")) == "" and stream.stopped and stream.text == "é🙂 x"
    stream = TextStream(decode, stop=["END"])
    assert [stream.push(b) for b in b"ENx"] == ["", "", "ENx"]
    assert stream.finish() == ""


def test_seeded_sampling_is_reproducible(llama):
    m, _ = llama
    a = m.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=7)
    assert a == m.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=7)
    assert a != m.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=8)
    greedy = m.generate(PROMPTS, max_new_tokens=20)
    assert m.generate(PROMPTS, max_new_tokens=20, temperature=0.7, top_k=1, seed=1) == greedy
    assert m.generate(PROMPTS, max_new_tokens=20, temperature=0.7, top_p=1e-6, seed=1) == greedy


def test_draw_gives_the_tokens_torch_multinomial_draws():
    logits = filter_logits(torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3, 50, 0.9)
    probs = logits.softmax(-1)  # zeros outside the top 50 and the nucleus
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    drawn = [draw(probs, ours) for _ in range(20)]
    assert all(torch.equal(d, torch.multinomial(probs, 1, generator=theirs)[:, 0]) for d in drawn)
    assert len({tuple(d.tolist()) for d in drawn}) > 1  # the generator moves on between draws
    assert all(bool(torch.isfinite(logits.gather(1, d[:, None])).all()) for d in drawn)


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).log()
    kept = lambda out: torch.isfinite(out[0]).nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=None)) == [0, 1]
    assert kept(filter_logits(logits, top_k=None, top_p=0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_k=None, top_p=0.8)) == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.85
    assert kept(filter_logits(logits, top_k=2, top_p=0.9)) == [0, 1]


def test_generation_stops_when_the_context_is_full(llama):
    m, _ = llama
    # The static cache holds prompt + max_new_tokens positions and refuses more, so this only passes when
    # max_new_tokens is clipped to the room the 128-position context leaves.
    assert isinstance(m.generate(PROMPTS[0], max_new_tokens=10_000, temperature=1.0, seed=0), str)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens: expected a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens: expected a positive integer"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(cache="paged"), "cache: expected 'static', 'dynamic' or 'graph'"),
        (dict(compile=True), "compile=True needs a CUDA device"),
    ],
)
def test_bad_generation_arguments_raise_input_error(llama, kwargs, message):
    m, _ = llama
    with pytest.raises(mmlm.InputError, match=message):
        m.generate(PROMPTS[0], **kwargs)


def test_prompt_longer_than_the_context_raises_input_error(llama):
    m, _ = llama
    long_prompt = "a cat sitting on the grass " * 60
    with pytest.raises(mmlm.InputError, match=r"prompt 1: \d+ tokens, but the model's context holds 128"):
        m.generate([PROMPTS[0], long_prompt])
    with pytest.raises(mmlm.InputError, match="context holds 128"):
        list(m.stream(long_prompt))
    with pytest.raises(mmlm.InputError, match="expected one prompt"):
        list(m.stream(PROMPTS))
    with pytest.raises(mmlm.InputError, match="non-empty list"):
        m.generate([])


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_messages_get_the_checkpoint_template(tmp_path):
    write_tiny_lm(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    m = mmlm.load(tmp_path)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a cat sitting on"}]
    # the same ids as transformers' apply_chat_template: the template writes <s>, the tokenizer adds none
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    texts, one, is_chat = m.prompt_texts(chat)
    assert one and is_chat and texts == [want]
    ids, _ = m.encode(texts, add_special_tokens=False)
    assert ids[0].tolist() == reference(want, add_special_tokens=False)["input_ids"]
    text = m.generate(chat, max_new_tokens=20)
    assert text == m.decode(greedy_ids_from(m, ids, 20))
    assert m.generate([chat, chat[1:]], max_new_tokens=20)[0] == text
    assert "".join(m.stream(chat, max_new_tokens=20)) == text
    m.save_pretrained(tmp_path / "out")
    assert mmlm.load(tmp_path / "out").generate(chat, max_new_tokens=20) == text


def test_chat_messages_without_a_template_raise_input_error(llama):
    m, _ = llama
    with pytest.raises(mmlm.InputError, match="chat messages need a chat template"):
        m.generate([{"role": "user", "content": "hi"}])
