"""The serving engine: continuous batching gives each request exactly its one-at-a-time output; the queue limit,
deadlines and cancellation hold; batched embeddings equal one-by-one ones; metrics are Prometheus text."""

import asyncio
import re
import time

import pytest
import torch
from fixtures_qwen2_vl import write_tiny_qwen2_vl
from PIL import Image
from skimage import data

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.errors import InputError
from mmlm.index import ImageIndex, ImageRecord
from mmlm.inference.generation import GenerationSettings
from mmlm.serve.engine import Engine, EngineConfig, QueueFull, RequestTimeout


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    write_tiny_llava(folder)
    return mmlm.load(folder)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    write_tiny_qwen2_vl(folder, "qwen2_5_vl")
    return mmlm.load(folder)


@pytest.fixture(scope="module")
def clip(model_dir):
    return mmlm.load(model_dir)


def photos():
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]


def chat(text, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def run(engine, body):
    async def main():
        await engine.start()
        try:
            return await body()
        finally:
            await engine.stop()

    return asyncio.run(main())


async def collect(engine, messages, images, settings, delay=0.0):
    await asyncio.sleep(delay)
    return "".join([piece async for piece in engine.generate(messages, images, settings)])


def slow(function, seconds):
    def wrapped(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return wrapped


REQUESTS = [
    (chat("Describe it."), [0], GenerationSettings(max_new_tokens=12)),
    (chat("What is this thing over there, tell me in detail?"), [1], GenerationSettings(max_new_tokens=20)),
    (chat("Hi", image=False), [], GenerationSettings(max_new_tokens=16)),
    (chat("Tell a long story please about cats", image=False), [], GenerationSettings(max_new_tokens=30)),
    (chat("Describe it."), [1], GenerationSettings(max_new_tokens=24, stop=("at",))),
    (chat("Hi", image=False), [], GenerationSettings(max_new_tokens=10, temperature=0.8, seed=3)),
]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_equal_generate_one_at_a_time(vlm, batching):
    assert_batched_equals_alone(vlm, batching)


def test_qwen2_vl_rows_join_a_running_batch_with_their_own_mrope_offsets(qwen):
    # each row's M-RoPE offset depends on its images; merged batches carry every row's own
    assert_batched_equals_alone(qwen, batching=True)


def assert_batched_equals_alone(vlm, batching: bool) -> None:
    images = photos()
    alone = [
        vlm.generate(
            m,
            [images[i] for i in idx],
            max_new_tokens=s.max_new_tokens,
            stop=s.stop,
            temperature=s.temperature,
            seed=s.seed,
        )  # fmt: skip
        for m, idx, s in REQUESTS
    ]
    # greedy and seeded sampling; max_batch 3 < 6 requests, arriving over time: later ones join the running batch as rows finish
    engine = Engine(vlm, config=EngineConfig(max_batch=3, batching=batching))

    async def body():
        jobs = [
            collect(engine, m, [images[i] for i in idx], s, delay=0.01 * n)
            for n, (m, idx, s) in enumerate(REQUESTS)
        ]
        return await asyncio.gather(*jobs)

    assert run(engine, body) == alone
    sizes = engine.metrics.batch_size.series[(("kind", "generate"),)]
    assert (sizes[-2] > sizes[-1]) == batching  # some decode step ran more than one row


def test_cancelled_stream_stops_consuming_steps(vlm):
    messages, images = chat("Tell a long story please about cats", image=False), []
    assert len(vlm.generate_tokens(messages, images, max_new_tokens=60)) == 60  # no end token before 60
    engine = Engine(vlm, config=EngineConfig(batch_wait_ms=0))

    async def body():
        stream = engine.generate(messages, images, GenerationSettings(max_new_tokens=60))
        await anext(stream)
        await stream.aclose()
        await asyncio.sleep(0.3)
        steps = engine.decode_steps
        await asyncio.sleep(0.3)
        return steps, engine.decode_steps

    before, after = run(engine, body)
    assert before == after < 10
    assert 'mmlm_requests_total{kind="generate",status="cancelled"} 1' in engine.metrics_text()


def test_generation_deadline_raises_request_timeout(vlm):
    engine = Engine(vlm, config=EngineConfig(timeout_s=0.3))
    engine._step = slow(engine._step, 0.1)

    async def body():
        with pytest.raises(RequestTimeout):
            await collect(engine, chat("Hi", image=False), [], GenerationSettings(max_new_tokens=50))

    run(engine, body)
    assert 'mmlm_requests_total{kind="generate",status="timeout"} 1' in engine.metrics_text()


def test_bad_generation_input_raises_input_error(vlm):
    engine = Engine(vlm)

    async def body():
        with pytest.raises(InputError):
            await collect(engine, chat("Describe it."), [], GenerationSettings())  # a placeholder, no image
        with pytest.raises(InputError):
            await collect(engine, chat("Hi"), photos()[:1], GenerationSettings(max_new_tokens=0))
        return await collect(engine, chat("Hi", image=False), [], GenerationSettings(max_new_tokens=4))

    assert run(engine, body) == vlm.generate(chat("Hi", image=False), max_new_tokens=4)


def test_full_queue_raises_queue_full_while_others_are_served(clip, monkeypatch):
    monkeypatch.setattr(clip, "encode_text", slow(clip.encode_text, 0.2))
    engine = Engine(embedder=clip, config=EngineConfig(max_queue=2, max_batch=1))

    async def body():
        first = asyncio.create_task(engine.embed_texts(["a dog"]))
        await asyncio.sleep(0.05)  # the first is running; two more fill the queue
        waiting = [asyncio.create_task(engine.embed_texts([t])) for t in ("a cat", "a car")]
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 2
        with pytest.raises(QueueFull) as full:
            await engine.embed_texts(["a boat"])
        return full.value.retry_after, await asyncio.gather(first, *waiting)

    retry_after, served = run(engine, body)
    assert retry_after > 0
    assert [v.shape for v in served] == [(1, clip.encode_text(["x"]).shape[1])] * 3
    assert 'mmlm_requests_total{kind="embed_text",status="rejected"} 1' in engine.metrics_text()


def test_embedding_deadline_raises_request_timeout(clip, monkeypatch):
    monkeypatch.setattr(clip, "encode_text", slow(clip.encode_text, 0.5))
    engine = Engine(embedder=clip, config=EngineConfig(timeout_s=0.1))

    async def body():
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await engine.embed_texts(["a dog"])
        return time.monotonic() - started

    assert run(engine, body) < 0.4


def test_batched_embeddings_equal_one_by_one(clip):
    texts = ["a photo of a dog", "an astronaut", "a cup of coffee on a table", "x"]
    images = photos()
    engine = Engine(embedder=clip, config=EngineConfig(batch_wait_ms=20))

    async def body():
        text_jobs = [engine.embed_texts([t]) for t in texts]
        image_jobs = [engine.embed_images([i]) for i in images]
        return await asyncio.gather(*text_jobs), await asyncio.gather(*image_jobs)

    text_vectors, image_vectors = run(engine, body)
    for t, v in zip(texts, text_vectors, strict=True):
        torch.testing.assert_close(v, clip.encode_text([t]).cpu(), atol=1e-5, rtol=1e-4)
    for i, v in zip(images, image_vectors, strict=True):
        torch.testing.assert_close(v, clip.encode_image([i]).cpu(), atol=1e-5, rtol=1e-4)
    assert engine.metrics.batch_size.series[(("kind", "embed_text"),)][-2] == len(texts)  # one call of 4


def test_classify_probabilities_sum_to_one_and_match_the_model(clip):
    engine = Engine(embedder=clip)
    labels = [["dog", "astronaut", "coffee"], ["cat", "car"]]

    async def body():
        return await asyncio.gather(*(engine.classify(photos()[n], labels[n]) for n in range(2)))

    for n, probs in enumerate(run(engine, body)):
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == pytest.approx(clip.classify([photos()[n]], labels[n])[0].tolist(), abs=1e-5)


def test_search_returns_rows_with_metadata(clip, tmp_path):
    images = photos()
    index = ImageIndex.create(tmp_path / "index", clip.encode_text(["x"]).shape[1])
    records = [ImageRecord(f"{name}.jpg", name * 8, 32, 32, caption=name) for name in ("astronaut", "coffee")]
    index.add(records, clip.encode_image(images))
    engine = Engine(embedder=clip, index=index)

    async def body():
        return await engine.search(None, images[1], 2), await engine.search("an astronaut", None, 1)

    by_image, by_text = run(engine, body)
    assert by_image[0]["path"] == "coffee.jpg" and by_image[0]["caption"] == "coffee"
    assert by_image[0]["score"] == pytest.approx(1.0, abs=1e-4) and len(by_image) == 2
    assert len(by_text) == 1 and set(by_text[0]) >= {"path", "caption", "score", "rank"}


SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\"(,[a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\")*\})? "
                    r"(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$")  # fmt: skip


def test_metrics_text_is_prometheus_and_counts_requests(clip):
    engine = Engine(embedder=clip)

    async def body():
        await asyncio.gather(*(engine.embed_texts([t]) for t in ("a", "b", "c")))
        with pytest.raises(InputError):
            await engine.embed_texts([])

    run(engine, body)
    text = engine.metrics_text()
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or SAMPLE.match(line), line
    assert 'mmlm_requests_total{kind="embed_text",status="ok"} 3' in text
    assert 'mmlm_request_seconds_count{kind="embed_text"} 3' in text
    for name in ("mmlm_queue_depth 0", "mmlm_generated_tokens_total 0", "mmlm_tokens_per_second 0"):
        assert name in text
