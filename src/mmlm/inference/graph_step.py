"""The decode step of a fixed-shape cache run from static buffers: captured once as a CUDA graph and replayed.

Decoding one token of a 7B model at batch 1 launches hundreds of small kernels; on a GPU the launches, not the
arithmetic, set the speed. A CUDA graph records the launches of one step once and replays them with one call, as
gpt-fast and vLLM do. That needs a step whose shapes and memory addresses never change: a FixedDecodeCache gives
the shapes (its slot, key mask and positions are device tensors it advances in place), and GraphStep gives the
addresses: the next token ids [B, 1] are copied into one static buffer before each step.

On CUDA the first step captures the graph (`capture_cuda_graph`) and every step replays it; elsewhere the same
fixed-shape step runs eagerly from the same buffers, so CPU tests go through every buffer and mask.
"""

from collections.abc import Callable, Sequence

import torch

from mmlm.errors import InputError
from mmlm.inference.generation import Step
from mmlm.layers.fixed_cache import FixedDecodeCache


def capture_cuda_graph(
    run: Callable[[], torch.Tensor], state: Sequence[torch.Tensor], warmup: int = 3
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Return (graph, static output) of `run` captured on the current CUDA device.

    As PyTorch's CUDA-graph guide asks, `run` first warms up on a side stream (lazy initialisation, cuBLAS
    workspaces and allocator pools happen outside the capture). Each warm-up run advances the `state` tensors
    in place, so they are put back after every run: the graph then starts from the state the caller left.
    """
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph, output


class GraphStep:
    """Prefill (eager, any length) and fixed-shape decode steps of `step` over a FixedDecodeCache.

    `capture` None captures a CUDA graph when the cache lives on a CUDA device. A replay writes its logits into
    the graph's one static output tensor, which the next replay overwrites; `__call__` returns a clone, so logits
    kept by the caller stay what they were.
    """

    def __init__(self, step: Step, cache: FixedDecodeCache, capture: bool | None = None) -> None:
        self.step = step
        self.cache = cache
        self.tokens = torch.zeros(
            cache.keys.shape[0], 1, dtype=torch.long, device=cache.keys.device
        )  # [B, 1]
        self.capture = cache.keys.device.type == "cuda" if capture is None else capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's static output [B, V]

    @property
    def written(self) -> int:
        """Return the slots written so far (the cache's host-side count)."""
        return self.cache.written

    def prefill(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the prompts [B, T] (ids or embeddings, mask [B, T] or None) eagerly; return the logits [B, V]."""
        self._reserve((input_ids if input_ids is not None else inputs_embeds).shape[1])
        return self.step(input_ids, inputs_embeds, attention_mask, self.cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token [B] and return the next-token logits [B, V]."""
        self._reserve(1)
        self.tokens.copy_(tokens.view(-1, 1))
        if not self.capture:
            return self.step(self.tokens, None, None, self.cache)
        if self.graph is None:
            run = lambda: self.step(self.tokens, None, None, self.cache)  # noqa: E731
            self.graph, self.logits = capture_cuda_graph(run, self.cache.state)
        self.graph.replay()
        return self.logits.clone()

    def _reserve(self, length: int) -> None:
        # An indexed copy past the buffers' end would fail on the device (a CUDA assert), so refuse it here.
        if self.written + length > self.cache.max_length:
            raise InputError(
                f"max_length: the fixed-shape cache holds {self.cache.max_length} slots; "
                f"{self.written} are written and {length} more were asked for"
            )
        self.cache.written += length


def graph_runner(step: Step, cache: FixedDecodeCache) -> GraphStep:
    """Return the GraphStep of `cache`, made on first use: a cache that GraphPool hands out again (reset) keeps
    its runner and so its captured graph. The graph replays the step it captured; `step` only matters here for
    a new cache (the same model gives the same step)."""
    if cache.runner is None:
        cache.runner = GraphStep(step, cache)
    return cache.runner


class GraphPool:
    """Fixed-shape caches kept between generate calls, each with its captured graph, so a graph is captured once
    per shape rather than once per call.

    A cache is keyed by batch size and its length rounded up to a multiple of `bucket` slots (prompt plus new
    tokens), so prompts of similar length share one graph; the extra slots are masked, never attended. At most
    `capacity` caches are held, the least recently used dropped first: each holds a whole KV cache of memory.
    `make(batch, length)` builds a new empty cache (DecoderLM.new_fixed_cache). Not for concurrent calls: two
    calls at once would share one cache (the loaded models' generate is not thread-safe either).
    """

    def __init__(
        self, make: Callable[[int, int], FixedDecodeCache], bucket: int = 256, capacity: int = 2
    ) -> None:
        if bucket < 1 or capacity < 1:
            raise ValueError(f"GraphPool: bucket and capacity must be positive, got {bucket} and {capacity}")
        self.make, self.bucket, self.capacity = make, bucket, capacity
        self.caches: dict[tuple[int, int], FixedDecodeCache] = {}  # in order of use, the latest last

    def length(self, needed: int) -> int:
        """Return the bucketed cache length for `needed` slots."""
        return -(-needed // self.bucket) * self.bucket

    def cache(self, batch: int, needed: int) -> FixedDecodeCache:
        """Return an empty cache for `batch` rows and at least `needed` slots: a held one reset, else a new one."""
        key = (batch, self.length(needed))
        cache = self.caches.pop(key, None)
        if cache is None:
            while len(self.caches) >= self.capacity:  # free the oldest before allocating the new one
                self.caches.pop(next(iter(self.caches)))
            cache = self.make(*key)
        else:
            cache.reset()
        self.caches[key] = cache
        return cache
