"""Decoding without a host synchronisation per token, over the fixed-shape steps of a GraphStep.

The loop of mmlm.inference.generation reads every token back to the host (`tokens.tolist()`) to test for end
tokens and stop strings and to drop finished rows; on a GPU each read waits for the device to drain. Here tokens
are picked on the device (`pick_tokens`: argmax, or the rows' shared sampler), written into a device buffer of
new tokens [B, max_new_tokens], and a device `finished` mask collects the end tokens. The host reads `finished`
only every `sync_every` steps, to stop once every row has ended, and reads the tokens once, after the loop. Rows
that have ended keep decoding (fixed shapes); what they produce is cut off.

The host then replays the tokens through the same DecodeRow logic as the eager loop (end tokens, stop strings,
max_new_tokens), so texts and ids equal that loop's. Stop strings are found in the text after the loop: a row
that meets one keeps decoding until an end token, max_new_tokens, or the next check that finds every row
ended, and its text is cut where the eager loop would have stopped. Sampled tokens equal the eager loop's with
fixed shapes (drop_finished=False): the sampler draws for every row at every step in both.

`read_back` is the one place the loop reads device values; everything else stays on the device.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from mmlm.errors import InputError
from mmlm.inference.generation import DecodeRow, GenerationSettings, Step, new_rows, pick_tokens
from mmlm.inference.graph_step import GraphStep, graph_runner
from mmlm.layers.fixed_cache import FixedDecodeCache


def read_back(tensor: torch.Tensor) -> Any:
    """Return a device tensor's values as Python numbers: the loop's only synchronisation with the device."""
    return tensor.tolist()


def check_room(cache: FixedDecodeCache, prompt_length: int, settings: GenerationSettings) -> None:
    """Raise InputError unless the cache holds the prompt and every new token but the last (never fed)."""
    need = prompt_length + settings.max_new_tokens - 1
    if need > cache.max_length:
        raise InputError(
            f"max_new_tokens: the fixed-shape cache holds {cache.max_length} slots, but a {prompt_length}-slot "
            f"prompt and {settings.max_new_tokens} new tokens need {need}"
        )


@torch.inference_mode()
def decode_on_device(
    runner: GraphStep,
    rows: list[DecodeRow],
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sync_every: int = 16,
) -> list[list[int]]:
    """Return every row's picked tokens [B][steps], end tokens and all, from a loop that reads `finished` back
    every `sync_every` steps and the tokens once."""
    if not isinstance(sync_every, int) or sync_every < 1:
        raise InputError(f"sync_every: expected a positive integer, got {sync_every!r}")
    prompt = input_ids if input_ids is not None else inputs_embeds
    check_room(runner.cache, prompt.shape[1], settings)
    device, steps = prompt.device, settings.max_new_tokens
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    new = torch.zeros(len(rows), steps, dtype=torch.long, device=device)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    logits = runner.prefill(input_ids, inputs_embeds, attention_mask)
    for i in range(steps):
        tokens = pick_tokens(rows, logits)
        new[:, i] = tokens
        finished |= (tokens[:, None] == eos).any(-1)
        done = i + 1
        if done == steps or (done % sync_every == 0 and read_back(finished.all())):
            break
        logits = runner(tokens)
    return read_back(new[:, :done])


def finish_rows(rows: list[DecodeRow], tokens: list[list[int]]) -> None:
    """Feed each row its tokens until it ends, as the eager loop would have (end token, stop string, length)."""
    for row, row_tokens in zip(rows, tokens, strict=True):
        for token in row_tokens:
            row.accept(token)
            if row.finish_reason is not None:
                break


def _decoded_rows(step: Step, cache: FixedDecodeCache, settings: GenerationSettings, eos_token_ids: Sequence[int],
                  input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, sync_every: int,
                  decode: Callable[[list[int]], str] | None = None) -> list[DecodeRow]:  # fmt: skip
    """Return the prompts' rows, each fed its decoded tokens until it ended (a text stream when `decode`)."""
    settings.check()
    prompt = input_ids if input_ids is not None else inputs_embeds
    rows = new_rows(settings, eos_token_ids, prompt.shape[0], prompt.device, decode)
    tokens = decode_on_device(graph_runner(step, cache), rows, settings, eos_token_ids, input_ids, inputs_embeds,
                              attention_mask, sync_every)  # fmt: skip
    finish_rows(rows, tokens)
    return rows


def generate_fixed_ids(
    step: Step,
    cache: FixedDecodeCache,
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sync_every: int = 16,
) -> list[list[int]]:
    """Return every row's new token ids (end token excluded), decoded with fixed-shape steps on `cache`."""
    rows = _decoded_rows(
        step, cache, settings, eos_token_ids, input_ids, inputs_embeds, attention_mask, sync_every
    )
    return [row.tokens for row in rows]


def generate_fixed_texts(
    step: Step,
    cache: FixedDecodeCache,
    decode: Callable[[list[int]], str],
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sync_every: int = 16,
) -> list[str]:
    """Return every row's new text, decoded with fixed-shape steps on `cache` and cut before any stop string."""
    streams = decode if settings.stop else None  # only stop strings need the text as it grows
    rows = _decoded_rows(step, cache, settings, eos_token_ids, input_ids, inputs_embeds, attention_mask, sync_every,
                         streams)  # fmt: skip
    if not settings.stop:
        return [decode(row.tokens) for row in rows]
    return [row.stream.text for row in rows]


@torch.inference_mode()
def stream_fixed(
    step: Step,
    cache: FixedDecodeCache,
    decode: Callable[[list[int]], str],
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[list[tuple[int, str]]]:
    """Yield lists of (row, text piece) as text becomes certain, reading each step's tokens back (a stream
    shows every token as it comes, so it synchronises once per token; the steps are still the graphed ones)."""
    settings.check()
    prompt = input_ids if input_ids is not None else inputs_embeds
    check_room(cache, prompt.shape[1], settings)
    rows = new_rows(settings, eos_token_ids, prompt.shape[0], prompt.device, decode)
    runner = graph_runner(step, cache)
    logits = runner.prefill(input_ids, inputs_embeds, attention_mask)
    while True:
        tokens = pick_tokens(rows, logits)
        pieces = [(row.key, row.accept(token)[1])
                  for row, token in zip(rows, read_back(tokens), strict=True) if row.finish_reason is None]  # fmt: skip
        if any(piece for _, piece in pieces):
            yield [(key, piece) for key, piece in pieces if piece]
        if all(row.finish_reason is not None for row in rows):
            break
        logits = runner(tokens)
    tails = [(row.key, tail) for row in rows if (tail := row.stream.finish())]
    if tails:
        yield tails
