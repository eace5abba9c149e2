"""The serving engine: an asyncio scheduler between HTTP handlers and the models.

Generation uses continuous batching. One decode batch runs step by step; at each step boundary, requests
that have been waiting are prefilled together and their key/value caches are merged into the running batch
(both sides left-padded to the longer cache; the attention mask hides the padding and positions come from
the mask, so every row sees exactly its own tokens). A row leaves the batch when it ends (end token, stop
string, max_new_tokens), is cancelled or times out, or its consumer falls `stream_buffer` pieces behind, and leading padding no row needs any more is cut off.
A fusion style that keeps per-prompt state in the cache (Flamingo's media) is not `batchable`: it does not merge,
so new requests join only an empty batch there (static batching).

Embeddings, zero-shot classification and search requests that arrive within `batch_wait_ms` of each other
go to the contrastive model as one call per kind. All model calls run on one worker thread, so the event
loop stays responsive and the models never run concurrently.
"""

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from mmlm.errors import InputError
from mmlm.inference.generation import (
    DecodeBatch,
    DecodeRow,
    GenerationSettings,
    merge_batches,
    new_rows,
    prefill,
    select_rows,
    step_batch,
    take_tokens,
    trim_padding,
    vlm_step,
)
from mmlm.serve.encoding import run_encodings, search_hits
from mmlm.serve.metrics import ServerMetrics

if TYPE_CHECKING:
    from mmlm.index import ImageIndex as SearchIndex
    from mmlm.inference.contrastive import ContrastiveModel
    from mmlm.inference.vlm import GenerativeModel

log = logging.getLogger("mmlm.serve")


class QueueFull(Exception):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """A request's deadline (queue wait included) passed before it finished."""


class StreamStalled(Exception):
    """A stream's consumer read nothing while `stream_buffer` pieces waited; its row was dropped."""


@dataclass
class EngineConfig:
    """Queue limit, batch size and wait, batching on/off, and the per-request deadline."""

    max_queue: int = 64  # requests waiting (not yet running) across all kinds; beyond: QueueFull
    max_batch: int = 8  # requests per model batch
    batch_wait_ms: float = 5.0  # how long the batcher waits to fill a batch
    batching: bool = True  # False: one request at a time (for the load test's comparison)
    timeout_s: float = 120.0  # per request, queue wait included
    # text pieces a stream may hold unread; past it the stream ends (StreamStalled) and its row leaves the batch,
    # so a client that stops reading costs at most this much memory and never holds the batch
    stream_buffer: int = 256


_END = object()  # the last item of a generation's output queue


@dataclass
class GenerationStats:
    """Filled in by `Engine.generate`: the prompt's tokens (image tokens included) once it is checked, and when
    the reply ends the tokens it decoded and why it stopped."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end token or stop string) | "length" (max tokens or context)
    # set when the engine ended the stream because its consumer fell `stream_buffer` pieces behind; the HTTP
    # response waits on it to close a connection whose client stopped reading
    stalled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Request:
    """One request while it waits or runs: what the consumer awaits, and whether it still wants the result."""

    kind: str
    deadline: float
    started: float = field(default_factory=time.monotonic)
    state: str = "waiting"  # waiting -> running -> done
    cancelled: bool = False  # the consumer left (disconnect, timeout); the scheduler drops the work


@dataclass(eq=False)
class _Generation(_Request):
    messages: list[dict] = field(default_factory=list)
    images: list[PIL.Image.Image] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)  # encoded audio files, in the order of the audio parts
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # text pieces, then _END or an exception
    row: DecodeRow | None = None  # its decoding state (max_new_tokens cut to the room left in the context)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # see GenerationStats.stalled


@dataclass(eq=False)
class _Encoding(_Request):
    payload: Any = None  # texts, images, (image, labels) or (text, image, k), after `kind`
    future: asyncio.Future | None = None


class Engine:
    """Queues, batches and runs generation, embedding, classification and search requests."""

    def __init__(
        self,
        vlm: "GenerativeModel | None" = None,
        embedder: "ContrastiveModel | None" = None,
        index: "SearchIndex | None" = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.vlm, self.embedder, self.index = vlm, embedder, index
        self.config = config or EngineConfig()
        self.metrics = ServerMetrics()
        self.decode_steps = 0  # model calls that advanced the decode batch (for tests and load checks)
        self._generations: deque[_Generation] = deque()
        self._encodings: deque[_Encoding] = deque()
        self._running: list[_Generation] = []
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task] = []
        self._wake_generation = asyncio.Event()
        self._wake_encoding = asyncio.Event()
        self._step = vlm_step(vlm.model) if vlm is not None else None

    # lifecycle
    async def start(self) -> None:
        """Start the model thread and the two schedulers (generation, encoding)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmlm-model")
        self._wake_generation, self._wake_encoding = asyncio.Event(), asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._generation_loop(), name="mmlm-generation"),
            asyncio.create_task(self._encoding_loop(), name="mmlm-encoding"),
        ]

    async def stop(self) -> None:
        """Stop the schedulers, fail what is still queued or running, and release the model thread."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        stopped = RuntimeError("the engine stopped")
        for req in [*self._generations, *self._running]:
            req.out.put_nowait(stopped)
        for req in self._encodings:
            if not req.future.done():
                req.future.set_exception(stopped)
        self._generations.clear()
        self._encodings.clear()
        self._running = []
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None

    # state
    @property
    def queue_depth(self) -> int:
        """Return the number of requests waiting (not yet running), all kinds together."""
        return sum(r.state == "waiting" and not r.cancelled for r in (*self._generations, *self._encodings))

    def metrics_text(self) -> str:
        """Return the engine's metrics in the Prometheus text exposition format."""
        return self.metrics.render(self.queue_depth, len(self._running))

    def _enqueue(self, req: _Request, queue: deque, wake: asyncio.Event) -> None:
        if not self._tasks:
            raise RuntimeError("the engine is not started; call `await engine.start()` first")
        depth = self.queue_depth
        if depth >= self.config.max_queue:
            self.metrics.request(req.kind, "rejected", 0.0)
            # roughly the time for the batches ahead of a new request to clear
            batches = math.ceil((depth + 1) / (self.config.max_batch if self.config.batching else 1))
            raise QueueFull(max(0.1, batches * self.metrics.mean_request_seconds()))
        queue.append(req)
        wake.set()

    async def _await(self, req: _Request, awaitable):
        """Await `awaitable` until the request's deadline; past it, drop the request and raise RequestTimeout."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, req.deadline - time.monotonic()))
        except TimeoutError:
            req.cancelled = True
            raise RequestTimeout(
                f"{req.kind}: no result within {self.config.timeout_s:g} s (queue wait included)"
            ) from None

    def _finish(self, req: _Request, status: str) -> None:
        if req.state != "done":
            req.state, req.cancelled = "done", True
            self.metrics.request(req.kind, status, time.monotonic() - req.started)

    # generation
    def prompt_tokens(
        self, messages: list[dict], images: list[PIL.Image.Image], audio: list[bytes] = ()
    ) -> int:
        """Return the prompt's length in VLM tokens, image and audio tokens and the generation prompt included."""
        if self.vlm is None:
            raise InputError("generation: this server has no generative model loaded")
        batch = self.vlm.processor(
            [messages], [list(images)], add_generation_prompt=True, audio=[list(audio)]
        )
        return int(batch["input_ids"].shape[1])

    async def generate(
        self,
        messages: list[dict],
        images: list[PIL.Image.Image],
        settings: GenerationSettings,
        stats: GenerationStats | None = None,
        audio: list[bytes] = (),
    ) -> AsyncIterator[str]:
        """Yield the reply's text in pieces as it is decoded; raise QueueFull, RequestTimeout or InputError.

        Closing the iterator early (a client that disconnects) drops the request from the decode batch. When
        the reply ends, `stats` holds its decoded token count and finish reason (for `usage`).
        """
        settings.check()
        started = time.monotonic()
        prompt = await asyncio.to_thread(self.prompt_tokens, messages, images, audio)  # also checks the media
        if stats is not None:
            stats.prompt_tokens = prompt
        room = self.vlm.config.lm.max_positions - prompt
        if room <= 0:
            raise InputError(
                f"messages: {prompt} tokens (image tokens included), but the model's context holds "
                f"{self.vlm.config.lm.max_positions}"
            )
        req = _Generation("generate", started + self.config.timeout_s, started, messages=messages,
                          images=list(images), audio=list(audio))  # fmt: skip
        if stats is not None:
            req.stalled = stats.stalled
        cut = dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, room))
        [req.row] = new_rows(cut, self.vlm.eos_token_ids, 1, self.vlm.device, self.vlm.decode, keys=[req])
        self._enqueue(req, self._generations, self._wake_generation)
        status = "cancelled"
        try:
            while (item := await self._await(req, req.out.get())) is not _END:
                if isinstance(item, BaseException):
                    status = "error"
                    raise item
                yield item
            status = "ok"
        except RequestTimeout:
            status = "timeout"
            raise
        finally:
            if stats is not None:
                stats.completion_tokens, stats.finish_reason = len(req.row.tokens), req.row.finish_reason
            self._finish(req, status)

    async def _generation_loop(self) -> None:
        loop = asyncio.get_running_loop()
        batch: DecodeBatch | None = None
        while True:
            if batch is None and not any(not r.cancelled for r in self._generations):
                self._wake_generation.clear()
                await self._wake_generation.wait()
                if self.config.batching and self.config.batch_wait_ms > 0:  # let a burst arrive together
                    await asyncio.sleep(self.config.batch_wait_ms / 1000)
            admitted = self._admit(batch)
            try:
                batch, events, size = await loop.run_in_executor(
                    self._executor, self._advance, batch, admitted
                )
            except Exception as error:  # noqa: BLE001 - the failure goes to every request it touched
                for req in [*(row.key for row in (batch.rows if batch else [])), *admitted]:
                    req.out.put_nowait(error)
                batch, events, size = None, [], 0
            if size:
                self.decode_steps += 1
                self.metrics.batch("generate", size)
            tokens = 0
            for req, item, done, new in events:
                tokens += new
                if req.stalled.is_set():
                    continue
                if isinstance(item, str) and req.out.qsize() >= self.config.stream_buffer:
                    self._stall(req)
                    continue
                if item:  # a text piece, or the exception that ended the request
                    req.out.put_nowait(item)
                if done and not isinstance(item, BaseException):
                    req.out.put_nowait(_END)
            self.metrics.tokens(tokens)
            self._running = [row.key for row in batch.rows] if batch is not None else []

    def _stall(self, req: _Generation) -> None:
        """End a stream whose consumer stopped reading: its row leaves the batch at the next step."""
        log.warning(
            "generate: the client read nothing while %d pieces waited (stream_buffer); stream closed, row dropped",
            req.out.qsize(),
        )
        self._finish(req, "stalled")  # marks it cancelled: `_advance` drops the row before the next step
        req.stalled.set()
        req.out.put_nowait(StreamStalled(f"the client fell {self.config.stream_buffer} pieces behind"))

    def _admit(self, batch: DecodeBatch | None) -> list[_Generation]:
        """Take the waiting requests that join the batch at this step boundary."""
        running = len(batch.rows) if batch is not None else 0
        limit = self.config.max_batch if self.config.batching else 1
        if running and (not self.config.batching or not self.vlm.model.style.batchable):
            return []
        admitted = []
        while self._generations and running + len(admitted) < limit:
            req = self._generations.popleft()
            if not req.cancelled:
                req.state = "running"
                admitted.append(req)
        return admitted

    @torch.inference_mode()
    def _advance(
        self, batch: DecodeBatch | None, admitted: list[_Generation]
    ) -> tuple[DecodeBatch | None, list[tuple[_Generation, Any, bool, int]], int]:
        """Run one decode step of the batch and prefill the admitted requests (model thread).

        Returns the new batch, (request, text piece or exception, finished, new tokens) events, and the decode step's size.
        """
        events: list[tuple[_Generation, Any, bool, int]] = []
        size = 0
        if batch is not None:
            batch = self._select(batch, [i for i, row in enumerate(batch.rows) if not row.key.cancelled])
        if batch is not None:
            size = len(batch.rows)
            batch = self._take(batch, step_batch(self._step, batch), events)
        if admitted:
            try:
                new, logits = self._prefill(admitted)
            except Exception as error:  # noqa: BLE001 - a bad prompt fails its own requests, not the batch
                events.extend((req, error, True, 0) for req in admitted)
                return batch, events, size
            new = self._take(new, logits, events)
            batch = new if batch is None else (batch if new is None else merge_batches(batch, new))
        return batch, events, size

    def _prefill(self, reqs: list[_Generation]) -> tuple[DecodeBatch, torch.Tensor]:
        """Return the admitted requests as a batch with their prompts cached, and their next-token logits."""
        prompts, images, audio = [r.messages for r in reqs], [r.images for r in reqs], [r.audio for r in reqs]
        _, cache, _, embeds, mask = self.vlm.prepare(prompts, images, GenerationSettings(1), "dynamic", audio)
        return prefill(self._step, cache, [r.row for r in reqs], None, embeds, mask)

    def _take(self, batch: DecodeBatch, logits: torch.Tensor, events: list) -> DecodeBatch | None:
        """Pick each row's next token, stream its text, and drop the rows that ended."""
        size = len(batch.rows)
        for row, token, piece in take_tokens(batch, logits):
            done = row.finish_reason is not None
            events.append(
                (row.key, piece + (row.stream.finish() if done else ""), done, int(token is not None))
            )
        if not batch.running:
            return None
        if len(batch.rows) < size:
            self._compact(batch)
        return batch

    def _select(self, batch: DecodeBatch, keep: list[int]) -> DecodeBatch | None:
        """Keep rows `keep`; then cut the leading cache slots that are padding in every remaining row."""
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            select_rows(batch, keep)
            self._compact(batch)
        return batch

    def _compact(self, batch: DecodeBatch) -> None:
        """Cut the padding no row needs any more; without padding left the steps run with no mask at all."""
        if self.vlm.model.style.batchable:  # else its per-prompt state is tied to the prompt's length
            trim_padding(batch)
        if batch.mask is not None and bool(batch.mask.all()):
            batch.mask = None

    # embeddings, classification, search
    async def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Return L2-normalised text embeddings [N, D] from the contrastive model."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("input: expected a non-empty list of strings")
        return await self._encode("embed_text", list(texts))

    async def embed_images(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """Return L2-normalised image embeddings [N, D] from the contrastive model."""
        if not images:
            raise InputError("images: expected a non-empty list of images")
        return await self._encode("embed_image", list(images))

    async def classify(self, image: PIL.Image.Image, labels: list[str]) -> list[float]:
        """Return zero-shot probabilities over `labels` (softmax of the scaled cosines; they sum to 1)."""
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise InputError("labels: expected a non-empty list of non-empty strings")
        return await self._encode("classify", (image, list(labels)))

    async def search(self, text: str | None, image: PIL.Image.Image | None, k: int) -> list[dict]:
        """Return the index's top-k images for a text, an image, or both (their normalised mean), best first."""
        if self.index is None:
            raise InputError("search: this server has no index loaded")
        if text is None and image is None:
            raise InputError("search: expected a text, an image or both")
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k: expected a positive integer, got {k!r}")
        return await self._encode("search", (text, image, k))

    async def _encode(self, kind: str, payload: Any) -> Any:
        if self.embedder is None:
            raise InputError(f"{kind}: this server has no contrastive model loaded")
        started = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        req = _Encoding(kind, started + self.config.timeout_s, started, payload=payload, future=future)
        self._enqueue(req, self._encodings, self._wake_encoding)
        status = "error"
        try:
            result = await self._await(req, asyncio.shield(future))
            status = "ok"
            return result
        except RequestTimeout:
            status = "timeout"
            raise
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            self._finish(req, status)

    async def _encoding_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not any(not r.cancelled for r in self._encodings):
                self._wake_encoding.clear()
                await self._wake_encoding.wait()
                if self.config.batching and self.config.batch_wait_ms > 0:
                    await asyncio.sleep(self.config.batch_wait_ms / 1000)
            limit = self.config.max_batch if self.config.batching else 1
            batch: list[_Encoding] = []
            while self._encodings and len(batch) < limit:
                req = self._encodings.popleft()
                if not req.cancelled:
                    req.state = "running"
                    batch.append(req)
            for kind in dict.fromkeys(r.kind for r in batch):  # one model call per kind, in arrival order
                group = [r for r in batch if r.kind == kind]
                self.metrics.batch(kind, len(group))
                try:
                    payloads = [r.payload for r in group]
                    results = await loop.run_in_executor(
                        self._executor, run_encodings, self.embedder, self.index, kind, payloads
                    )
                except Exception as error:  # noqa: BLE001 - the failure goes to the requests in the call
                    results = [error] * len(group)
                for req, result in zip(group, results, strict=True):
                    if req.future.done():
                        continue
                    if kind == "search" and not isinstance(result, BaseException):
                        try:
                            result = search_hits(self.index, *result)
                        except Exception as error:  # noqa: BLE001
                            result = error
                    if isinstance(result, BaseException):
                        req.future.set_exception(result)
                    else:
                        req.future.set_result(result)
