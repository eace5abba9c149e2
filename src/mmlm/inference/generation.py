"""Text generation over any causal LM "step": batched with left padding, greedy or sampled, cached, streamed.

A step runs the model on new inputs and returns the next-token logits of every row:

    step(input_ids [B, T] | None, inputs_embeds [B, T, D] | None, attention_mask [B, S] | None, cache) -> [B, V]

The first call (prefill) gets the whole prompt, as ids or as embeddings (a VLM passes text embeddings with image
features merged in); every later call gets one token id per row. `lm_step(model)` makes a step from a
DecoderLM. Caches come from `model.new_cache(...)`; a row that finishes is dropped from the batch (and from its
cache) so the remaining rows run alone, and the loop ends when every row has finished.

The loop is built from step-level pieces that the server's continuous batching uses too: a `DecodeRow` per
sequence (settings, sampler, ids so far, text stream with its stop strings), `prefill`, `take_tokens` (pick and
record each row's token, drop the rows that ended), `step_batch` (feed the next tokens), and the cache row
operations `select_rows`, `trim_padding` and `merge_batches`.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch

from mmlm.errors import InputError
from mmlm.layers.attention import KVCache
from mmlm.models.decoder_lm import DecoderLM, LayerCache
from mmlm.models.vlm import VisionLanguageModel, VLMCache
from mmlm.processing.padding import left_pad

Step = Callable[
    [torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[LayerCache]], torch.Tensor
]
Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> token ids [B]


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick tokens and when to stop. temperature 0 is greedy; top_k / top_p filter before sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings (not included)
    seed: int | None = None

    def check(self) -> None:
        """Raise InputError for values that cannot be used."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise InputError(f"temperature: expected a value >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise InputError(f"top_k: expected a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop: expected non-empty strings, got {list(self.stop)}")


def lm_step(model: DecoderLM) -> Step:
    """Return the step function of a DecoderLM: logits of the last position only."""

    def step(input_ids, inputs_embeds, attention_mask, cache):
        out = model(input_ids, inputs_embeds, attention_mask, cache=cache, last_only=True)
        return out.logits[:, -1]

    return step


def vlm_step(model: VisionLanguageModel) -> Step:
    """Return the generation step of a VLM (see mmlm.inference.generation): logits of each row's last position.

    `cache` is the model's VLMCache: the LM's layer caches, and the fusion style's own (Flamingo's media) that
    generation's row selection reaches with them.
    """

    def step(input_ids, inputs_embeds, attention_mask, cache):
        media = cache.fusion if isinstance(cache, VLMCache) else None
        embeds = model.lm.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return model.run_lm(embeds, media, attention_mask, cache, last_only=True).logits[:, -1]

    return step


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Return logits [B, V] with tokens outside the top k, or outside the nucleus of mass top_p, set to −inf.

    The nucleus (Holtzman et al. 2020) is the smallest set of most likely tokens whose probabilities sum to
    at least top_p; the most likely token always stays.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # tokens reached only after the nucleus is already full
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_sampler(settings: GenerationSettings, device: torch.device) -> Sampler:
    """Return a function from logits [B, V] to token ids [B]: argmax, or a draw at the settings' temperature."""
    if settings.temperature == 0:
        return lambda logits: logits.argmax(-1)
    generator = torch.Generator(device)
    if settings.seed is not None:
        generator.manual_seed(settings.seed)
    else:
        generator.seed()

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
        return draw(logits.softmax(-1), generator)

    return sample


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return one token id per row [B] drawn from probabilities [B, V], as torch.multinomial(probs, 1) draws it.

    torch.multinomial's own algorithm for one sample, the Gumbel-max trick: argmax of p / q with q ~ Exp(1), so
    a generator gives the same tokens. It also checks the probabilities first, reading them back to the host,
    a synchronisation per token on a GPU; softmax of filtered logits needs no such check.
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


class TextStream:
    """Incremental text of one generated sequence: new pieces as tokens arrive, cut before a stop string.

    The whole sequence is decoded each time, so multi-token characters come out whole: a trailing U+FFFD
    (an incomplete UTF-8 byte sequence) is held back, as is any tail that could still grow into a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.emitted = 0  # characters handed out so far
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now certain (possibly empty)."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._emit(len(self.text))
        end = len(self.text.rstrip("\ufffd"))
        hold = 0  # longest not-yet-emitted tail that is a proper prefix of a stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.emitted), hold, -1):
                if self.text.endswith(s[:n], 0, end):
                    hold = n
                    break
        return self._emit(end - hold)

    def finish(self) -> str:
        """Return whatever text is still held back, once the sequence has ended."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


@dataclass(eq=False)
class DecodeRow:
    """One sequence being decoded: its settings, its sampler (None: greedy), the ids it produced, its text stream
    (which finds the stop strings) and why it ended ("stop" or "length"; None while it runs)."""

    settings: GenerationSettings
    eos_token_ids: frozenset[int]
    sample: Sampler | None = None
    stream: TextStream | None = None
    stop_test: Callable[[int], bool] | None = None  # a further end test on each kept token
    key: Any = None  # the caller's handle on the row: its place in the batch, its request
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def accept(self, token: int) -> tuple[int | None, str]:
        """Record the row's next token; return it (None for an end token, which is not kept) and the new text."""
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
            return None, ""
        self.tokens.append(token)
        piece = self.stream.push(token) if self.stream is not None else ""
        stopped = self.stream is not None and self.stream.stopped  # a stop string appeared
        if stopped or (self.stop_test is not None and self.stop_test(token)):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.settings.max_new_tokens:
            self.finish_reason = "length"
        return token, piece


def new_rows(
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    count: int,
    device: torch.device,
    decode: Callable[[list[int]], str] | None = None,
    keys: Sequence[Any] | None = None,
) -> list[DecodeRow]:
    """Return `count` rows that share one sampler, so that the batch draws its tokens as one (keys: 0, 1, …).

    With `decode`, each row streams its text and ends before the first of the settings' stop strings.
    """
    sample = None if settings.temperature == 0 else make_sampler(settings, device)
    eos = frozenset(eos_token_ids)
    keys = range(count) if keys is None else keys
    return [DecodeRow(settings, eos, sample, None if decode is None else TextStream(decode, settings.stop), key=key)
            for key in keys]  # fmt: skip


class RowToken(NamedTuple):
    """What one step did for one row: the token it kept (None at an end token) and the text that became certain."""

    row: DecodeRow
    token: int | None
    text: str


@dataclass
class DecodeBatch:
    """Rows decoded together: their caches (one per layer, rows first), attention mask [B, S] (None: no padding),
    and the token each row feeds next [B]."""

    rows: list[DecodeRow]
    cache: list[LayerCache]
    mask: torch.Tensor | None
    pending: torch.Tensor | None = None

    @property
    def running(self) -> bool:
        """Return whether any row has not ended."""
        return any(row.finish_reason is None for row in self.rows)


def pick_tokens(rows: Sequence[DecodeRow], logits: torch.Tensor) -> torch.Tensor:
    """Return each row's next token [B] from logits [B, V]: argmax for greedy rows, else a draw from the row's
    sampler. Rows that share a sampler (one `generate` call) draw together in one call; a served request has its
    own sampler and draws alone, so its tokens do not depend on the rows beside it."""
    tokens = logits.argmax(-1)
    groups: dict[int, tuple[Sampler, list[int]]] = {}
    for i, row in enumerate(rows):
        if row.sample is not None:
            groups.setdefault(id(row.sample), (row.sample, []))[1].append(i)
    for sample, index in groups.values():
        if len(index) == len(rows):
            tokens = sample(logits)
        else:
            at = torch.tensor(index, device=logits.device)
            tokens[at] = sample(logits[at])
    return tokens


def select_cache(cache: list[LayerCache], index: torch.Tensor) -> None:
    """Keep only the batch rows `index` of every layer's cache, and of a VLM fusion style's own cache."""
    if isinstance(cache, VLMCache):
        cache.select(index)
    else:
        for layer in cache:
            layer.select(index)


def select_rows(batch: DecodeBatch, keep: Sequence[int]) -> None:
    """Keep only the batch rows `keep`, in their caches, mask and pending tokens too."""
    index = torch.tensor(list(keep), device=batch.pending.device)
    select_cache(batch.cache, index)
    batch.rows = [batch.rows[i] for i in keep]
    batch.mask = batch.mask[index] if batch.mask is not None else None
    batch.pending = batch.pending[index]


def trim_padding(batch: DecodeBatch) -> None:
    """Cut the leading cache slots that are padding in every row (dynamic KV caches only)."""
    if batch.mask is None:
        return
    first = int(batch.mask.any(0).long().argmax())
    if first:
        batch.mask = batch.mask[:, first:]
        for layer in batch.cache:
            layer.k, layer.v = layer.k[:, :, first:], layer.v[:, :, first:]


def merge_batches(a: DecodeBatch, b: DecodeBatch) -> DecodeBatch:
    """Stack two batches' rows, left-padding the shorter dynamic cache: [Ba, H, Sa, Dh] + [Bb, H, Sb, Dh]."""
    masks = [
        x.mask if x.mask is not None else x.pending.new_ones(len(x.rows), x.cache[0].length) for x in (a, b)
    ]
    n = max(m.shape[1] for m in masks)
    cache = [
        KVCache(
            torch.cat([left_pad(la.k, n, 2), left_pad(lb.k, n, 2)]),
            torch.cat([left_pad(la.v, n, 2), left_pad(lb.v, n, 2)]),
        )
        for la, lb in zip(a.cache, b.cache, strict=True)
    ]
    if isinstance(
        a.cache, VLMCache
    ):  # only batchable styles merge; a per-row state of theirs is concatenated
        fusion = a.cache.fusion.cat(b.cache.fusion) if a.cache.fusion is not None else None
        cache = VLMCache(cache, fusion)
    mask = torch.cat([left_pad(masks[0], n, 1), left_pad(masks[1], n, 1)])
    return DecodeBatch(
        a.rows + b.rows, cache, None if bool(mask.all()) else mask, torch.cat([a.pending, b.pending])
    )


def take_tokens(batch: DecodeBatch, logits: torch.Tensor, drop_finished: bool = True) -> list[RowToken]:
    """Pick and record every running row's next token; return what each did, and (drop_finished) drop the rows
    that ended from the batch and its caches while others still run."""
    tokens = pick_tokens(batch.rows, logits)
    taken = [RowToken(row, *row.accept(token))
             for row, token in zip(batch.rows, tokens.tolist(), strict=True) if row.finish_reason is None]  # fmt: skip
    batch.pending = tokens
    keep = [i for i, row in enumerate(batch.rows) if row.finish_reason is None]
    if drop_finished and keep and len(keep) < len(batch.rows):
        select_rows(batch, keep)
    return taken


def step_batch(step: Step, batch: DecodeBatch) -> torch.Tensor:
    """Feed every row its pending token and return the next-token logits [B, V]; rows that ended but stay in the
    batch (fixed shapes) get a cache slot nothing attends to."""
    running = [row.finish_reason is None for row in batch.rows]
    if batch.mask is not None or not all(running):
        mask = batch.mask
        if mask is None:
            mask = torch.ones(
                len(running), batch.cache[0].length, dtype=torch.long, device=batch.pending.device
            )
        new = torch.tensor(running, dtype=mask.dtype, device=mask.device)[:, None]
        batch.mask = torch.cat([mask, new], dim=1)
    return step(batch.pending[:, None], None, batch.mask, batch.cache)


def prefill(
    step: Step,
    cache: list[LayerCache],
    rows: list[DecodeRow],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[DecodeBatch, torch.Tensor]:
    """Run the prompts [B, T] (ids or embeddings; mask None: no padding); return their batch and logits [B, V]."""
    logits = step(input_ids, inputs_embeds, attention_mask, cache)
    return DecodeBatch(rows, cache, attention_mask), logits


@torch.inference_mode()
def decode_rows(
    step: Step,
    cache: list[LayerCache],
    rows: list[DecodeRow],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    drop_finished: bool = True,
) -> Iterator[list[RowToken]]:
    """Prefill the prompts, then yield each step's RowTokens until every row has ended.

    With drop_finished=False the batch keeps its size (fixed shapes, e.g. for a compiled step) and finished
    rows are fed padding that nothing attends to.
    """
    batch, logits = prefill(step, cache, rows, input_ids, inputs_embeds, attention_mask)
    while True:
        yield take_tokens(batch, logits, drop_finished)
        if not batch.running:
            return
        logits = step_batch(step, batch)


@torch.inference_mode()
def generate_ids(
    step: Step,
    cache: list[LayerCache],
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    stop_row: Callable[[int, int], bool] | None = None,
    drop_finished: bool = True,
) -> Iterator[list[tuple[int, int]]]:
    """Yield, once per step, (row, token) for every row still running; a row ends at an eos token (not yielded),
    when `stop_row(row, token)` says so (yielded), or after max_new_tokens.

    `attention_mask` [B, T] marks left padding (None: none). With drop_finished=False the batch keeps its size
    (fixed shapes, e.g. for a compiled step) and finished rows are fed padding that nothing attends to.
    """
    settings.check()
    prompt = input_ids if input_ids is not None else inputs_embeds
    rows = new_rows(settings, eos_token_ids, prompt.shape[0], prompt.device)
    if stop_row is not None:
        for row in rows:
            row.stop_test = partial(stop_row, row.key)
    for taken in decode_rows(step, cache, rows, input_ids, inputs_embeds, attention_mask, drop_finished):
        out = [(t.row.key, t.token) for t in taken if t.token is not None]
        if out:
            yield out


def stream_text(
    step: Step,
    cache: list[LayerCache],
    decode: Callable[[list[int]], str],
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    drop_finished: bool = True,
) -> Iterator[list[tuple[int, str]]]:
    """Yield lists of (row, text piece) as text becomes certain; each row's pieces join to its full output."""
    settings.check()
    prompt = input_ids if input_ids is not None else inputs_embeds
    rows = new_rows(settings, eos_token_ids, prompt.shape[0], prompt.device, decode)
    for taken in decode_rows(step, cache, rows, input_ids, inputs_embeds, attention_mask, drop_finished):
        pieces = [(t.row.key, t.text) for t in taken if t.text]
        if pieces:
            yield pieces
    tails = [(row.key, tail) for row in rows if (tail := row.stream.finish())]
    if tails:
        yield tails


def generate_texts(
    step: Step,
    cache: list[LayerCache],
    decode: Callable[[list[int]], str],
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    drop_finished: bool = True,
) -> list[str]:
    """Return every row's new text. Only stop strings need the text as it grows; otherwise it is decoded once."""
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    if settings.stop:
        texts = [""] * batch
        for pieces in stream_text(step, cache, decode, settings, eos_token_ids, input_ids, inputs_embeds,
                                  attention_mask, drop_finished):  # fmt: skip
            for row, piece in pieces:
                texts[row] += piece
        return texts
    tokens: list[list[int]] = [[] for _ in range(batch)]
    for step_tokens in generate_ids(step, cache, settings, eos_token_ids, input_ids, inputs_embeds,
                                    attention_mask, drop_finished=drop_finished):  # fmt: skip
        for row, token in step_tokens:
            tokens[row].append(token)
    return [decode(t) for t in tokens]
