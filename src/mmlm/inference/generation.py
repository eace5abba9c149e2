"""Text generation over any causal LM "step": batched with left padding, greedy or sampled, cached, streamed.

A step runs the model on new inputs and returns the next-token logits of every row:

    step(input_ids [B, T] | None, inputs_embeds [B, T, D] | None, attention_mask [B, S] | None, cache) -> [B, V]

The first call (prefill) gets the whole prompt, as ids or as embeddings (a VLM passes text embeddings with image
features merged in); every later call gets one token id per row. `lm_step(model)` makes a step from a
DecoderLM. Caches come from `model.new_cache(...)`; a row that finishes is dropped from the batch (and from its
cache) so the remaining rows run alone, and the loop ends when every row has finished.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mmlm.errors import InputError
from mmlm.models.decoder_lm import DecoderLM, LayerCache
from mmlm.models.vlm import VisionLanguageModel, VLMCache

Step = Callable[
    [torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[LayerCache]], torch.Tensor
]


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


def make_sampler(
    settings: GenerationSettings, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
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
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return sample


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
    sample = make_sampler(settings, (input_ids if input_ids is not None else inputs_embeds).device)
    logits = step(input_ids, inputs_embeds, attention_mask, cache)
    device = logits.device
    rows = list(range(logits.shape[0]))  # original row of each sequence still in the batch
    running = [True] * len(rows)
    eos = set(eos_token_ids)
    for count in range(1, settings.max_new_tokens + 1):
        tokens = sample(logits)  # [b]
        out = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if running[i] and token not in eos:
                out.append((row, token))
                running[i] = stop_row is None or not stop_row(row, token)
            else:
                running[i] = False
        if out:
            yield out
        if not any(running) or count == settings.max_new_tokens:
            return
        if drop_finished and not all(running):
            keep = [i for i, r in enumerate(running) if r]
            index = torch.tensor(keep, device=device)
            if isinstance(cache, VLMCache):  # its fusion style's cache loses the rows too
                cache.select(index)
            else:
                for layer in cache:
                    layer.select(index)
            rows, tokens, running = [rows[i] for i in keep], tokens[index], [True] * len(keep)
            attention_mask = attention_mask[index] if attention_mask is not None else None
        if attention_mask is not None or not all(running):
            # finished rows (kept for fixed shapes) get a slot nothing attends to
            if attention_mask is None:
                attention_mask = torch.ones(len(rows), cache[0].length, dtype=torch.long, device=device)
            new = torch.tensor(running, dtype=attention_mask.dtype, device=device)[:, None]
            attention_mask = torch.cat([attention_mask, new], dim=1)
        logits = step(tokens[:, None], None, attention_mask, cache)


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
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    streams = [TextStream(decode, settings.stop) for _ in range(batch)]
    pending: dict[int, str] = {}

    def stop_row(row: int, token: int) -> bool:
        pending[row] = pending.get(row, "") + streams[row].push(token)
        return streams[row].stopped

    for _ in generate_ids(step, cache, settings, eos_token_ids, input_ids, inputs_embeds, attention_mask,
                          stop_row, drop_finished):  # fmt: skip
        pieces = [(row, piece) for row, piece in pending.items() if piece]
        pending.clear()
        if pieces:
            yield pieces
    tails = [(row, tail) for row, s in enumerate(streams) if (tail := s.finish())]
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
