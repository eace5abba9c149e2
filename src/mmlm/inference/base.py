"""What every loaded model shares: the nn.Module, its config, device and dtype, and `save_pretrained`; and, for
the two that generate text (CausalLM, GenerativeModel), end tokens, settings and the generate/stream plumbing.

`save_pretrained` writes a transformers folder where the family can (`_transformers_folder`), else mmlm's own
format (checkpoints/mmlm_format.py), then the family's other files (`_save_files`: tokenizer, preprocessing,
generation config).
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from mmlm.checkpoints.mmlm_format import check_save_format, write_json, write_mmlm
from mmlm.checkpoints.safetensors_io import write_weights
from mmlm.errors import InputError
from mmlm.inference.generation import GenerationSettings, generate_texts, stream_text
from mmlm.inference.graph_decode import generate_fixed_texts, stream_fixed
from mmlm.inference.graph_step import GraphPool
from mmlm.layers.fixed_cache import FixedDecodeCache
from mmlm.models.decoder_lm import DecoderLM

# static: preallocated, dynamic: growing, graph: fixed shapes, decode steps replayed as a CUDA graph
# (inference/graph_step.py) with no host synchronisation per token (inference/graph_decode.py)
CacheKind = Literal["static", "dynamic", "graph"]
# what a family's prepare returns: (step, KV cache, settings cut to the context, ids or embeddings, mask)
Prepared = tuple[Callable, list, GenerationSettings, torch.Tensor, torch.Tensor | None]


class LoadedModel:
    """A model ready for use: `model` (the nn.Module), `config`, `device`, `dtype`, `save_pretrained`."""

    model: nn.Module
    architecture: str  # mmlm's name for the family in config.json, which mmlm.load dispatches on
    reference_weight: str  # the parameter whose device and dtype stand for the whole model's

    @property
    def config(self) -> Any:
        """Return the model's config dataclass."""
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        """Return the device the weights live on."""
        return self.model.get_parameter(self.reference_weight).device

    @property
    def dtype(self) -> torch.dtype:
        """Return the weights' dtype."""
        return self.model.get_parameter(self.reference_weight).dtype

    def save_pretrained(self, folder: str | Path, format: str = "auto") -> Path:
        """Write a transformers folder where transformers has the architecture (`auto`), else (or with
        `format="mmlm"`) mmlm's; return the folder."""
        check_save_format(format)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = self._weights_to_save()
        exported = self._transformers_folder(weights) if format == "auto" else None
        if exported is None:
            write_mmlm(folder, self.architecture, self.config, weights)
        else:
            config, their_weights = exported
            write_weights(their_weights, folder / "model.safetensors")
            write_json(folder / "config.json", config)
        self._save_files(folder)
        return folder

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """Return (transformers config.json, tensors under transformers' names), or None where none fits."""
        return None

    def _save_files(self, folder: Path) -> None:
        """Write the family's files beside config.json and the weights."""


def end_token_ids(
    config_ids: Sequence[int], given: Sequence[int] | None, tokenizer_eos: int | None
) -> list[int]:
    """Return the ids generation stops at: `given` (a generation_config.json's) or the config's, plus the
    tokenizer's end token when neither lists it (as transformers' generate does)."""
    eos = list(config_ids if given is None else given)
    if tokenizer_eos is not None and tokenizer_eos not in eos:
        eos.append(tokenizer_eos)
    return eos


def generation_settings(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop: str | Sequence[str],
    seed: int | None,
) -> GenerationSettings:
    """Return the settings of a generate/stream call; one stop string may be given bare."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    return GenerationSettings(max_new_tokens, temperature, top_k, top_p, stop, seed)


def check_request(settings: GenerationSettings, cache: str, graph: bool = False) -> None:
    """Raise InputError unless the settings and the KV-cache kind of a generate/stream call are usable;
    `graph`: the family decodes with cache="graph" (DecoderLM-based: CausalLM, LLaVA-style VLMs)."""
    settings.check()
    if cache == "graph" and not graph:
        raise InputError(
            "cache: 'graph' decodes CausalLM and LLaVA-style VLMs; this model takes 'static' or 'dynamic'"
        )
    if cache not in get_args(CacheKind):
        raise InputError(f"cache: expected 'static', 'dynamic' or 'graph', got {cache!r}")


class GenerativeBase(LoadedModel):
    """A loaded model that writes text: `decode`, `eos_token_ids`, and the decode loop run on a prepared batch."""

    eos_token_ids: list[int]
    prepares_embeddings: bool  # whether prepare hands the loop input embeddings (True) or token ids

    def _fixed_cache(self, lm: DecoderLM, batch: int, length: int) -> FixedDecodeCache:
        """Return an empty fixed-shape cache of `lm` for cache="graph", from this model's GraphPool: calls with the
        same batch size and a similar length reuse one cache and its captured CUDA graph."""
        pool = getattr(self, "_graph_pool", None)
        if pool is None:
            pool = self._graph_pool = GraphPool(lm.new_fixed_cache)
        return pool.cache(batch, length)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of token ids, special tokens skipped."""
        raise NotImplementedError

    def _loop_inputs(self, prepared: Prepared) -> tuple[Any, ...]:
        step, kv, settings, inputs, mask = prepared
        ids, embeds = (None, inputs) if self.prepares_embeddings else (inputs, None)
        return step, kv, self.decode, settings, self.eos_token_ids, ids, embeds, mask

    def _generate_texts(self, prepared: Prepared, drop_finished: bool = True) -> list[str]:
        if isinstance(prepared[1], FixedDecodeCache):
            return generate_fixed_texts(*self._loop_inputs(prepared))
        return generate_texts(*self._loop_inputs(prepared), drop_finished=drop_finished)

    def _stream_pieces(self, prepared: Prepared) -> Iterator[str]:
        loop = stream_fixed if isinstance(prepared[1], FixedDecodeCache) else stream_text
        for pieces in loop(*self._loop_inputs(prepared)):
            for _, piece in pieces:
                yield piece
