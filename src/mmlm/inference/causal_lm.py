"""A loaded text LM: DecoderLM + its tokenizer, with `generate`, `stream` and `save_pretrained`.

A string prompt is used as written (no chat template) and tokenised with the checkpoint's tokenizer.json,
special tokens included, as transformers' tokenizer(prompt) does. A list of chat messages gets the checkpoint's
chat template with the generation prompt, tokenised without adding special tokens, as apply_chat_template does.
Output is the new text only, special tokens skipped.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from mmlm.checkpoints.hf_llama import (
    drop_derived,
    hf_model_type,
    llama_key_map,
    lm_config_from_hf,
    lm_config_to_hf,
)
from mmlm.checkpoints.keymap import Rule, to_ours, to_theirs
from mmlm.checkpoints.mmlm_format import read_mmlm, write_json
from mmlm.checkpoints.safetensors_io import read_weights
from mmlm.errors import InputError
from mmlm.inference.base import CacheKind, GenerativeBase, check_request, end_token_ids, generation_settings
from mmlm.inference.generation import GenerationSettings, Step, lm_step
from mmlm.json_files import read_json_object
from mmlm.models.decoder_lm import DecoderLM, LayerCache, LMConfig
from mmlm.processing.chat import ChatTemplate, Message, check_messages
from mmlm.processing.padding import pad_rows
from mmlm.processing.tokenizer import HFTokenizer, load_tokenizer

# a text used as written, or a conversation [{"role": ..., "content": ...}, ...] for the chat template
Prompt = str | Sequence[Message]


class CausalLM(GenerativeBase):
    """A text LM ready for use: `generate`, `stream`, `save_pretrained`."""

    architecture = "decoder_lm"
    reference_weight = "token_embed.weight"
    prepares_embeddings = False

    def __init__(
        self,
        model: DecoderLM,
        tokenizer: HFTokenizer,
        source_format: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source_format = source_format  # transformers model_type it came from; export prefers it
        self.chat_template = chat_template
        # Unpadded, untruncated ids for prompts and incremental decoding of outputs.
        self._codec = Tokenizer.from_file(str(Path(tokenizer.model_dir) / "tokenizer.json"))
        self._codec.no_padding()
        self._codec.no_truncation()
        self.eos_token_ids = end_token_ids(model.cfg.eos_token_ids, eos_token_ids, tokenizer.eos_id)

    def prompt_texts(self, prompt: Prompt | Sequence[Prompt]) -> tuple[list[str], bool, bool]:
        """Return (texts, one prompt?, chat?) for a str, a list of str, a conversation or a list of those."""
        one = isinstance(prompt, str) or (
            isinstance(prompt, list | tuple) and bool(prompt) and isinstance(prompt[0], dict)
        )
        prompts = [prompt] if one else list(prompt)
        if not prompts:
            raise InputError(
                "prompt: expected a string, a list of chat messages, or a non-empty list of them"
            )
        if all(isinstance(p, str) for p in prompts):
            return prompts, one, False
        if self.chat_template is None:
            raise InputError("prompt: chat messages need a chat template, and this checkpoint has none")
        texts = []
        for p in prompts:
            if isinstance(p, str):
                raise InputError("prompt: expected all strings or all conversations, not a mix")
            texts.append(self.chat_template.render_text(check_messages(p), add_generation_prompt=True))
        return texts, one, True

    def encode(
        self, prompts: Sequence[str], add_special_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return left-padded ids [B, T] and the attention mask [B, T] (None when no row is padded)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompt: expected a string or a non-empty list of strings")
        encoded = self._codec.encode_batch(list(prompts), add_special_tokens=add_special_tokens)
        rows = [e.ids for e in encoded]
        for i, row in enumerate(rows):
            if not row:
                raise InputError(f"prompt {i}: encodes to no tokens; the model needs at least one")
            if len(row) >= self.config.max_positions:
                raise InputError(
                    f"prompt {i}: {len(row)} tokens, but the model's context holds {self.config.max_positions} "
                    "(prompt and new tokens together)"
                )
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids, mask = pad_rows(rows, pad), pad_rows([[1] * len(row) for row in rows], 0)
        return ids.to(self.device), (mask.to(self.device) if not bool(mask.all()) else None)

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of token ids, special tokens skipped."""
        return self._codec.decode(list(ids), skip_special_tokens=True)

    def prepare(
        self, texts: list[str], chat: bool, settings: GenerationSettings, cache: CacheKind, compile: bool
    ) -> tuple[Step, list[LayerCache], GenerationSettings, torch.Tensor, torch.Tensor | None]:
        """Return (step, cache, settings cut to the context, prompt ids, mask or None) for a batch of prompts."""
        check_request(settings, cache, graph=True)
        ids, mask = self.encode(texts, add_special_tokens=not chat)  # templates write their own bos
        # Prompt and new tokens share the context; generation stops when it is full.
        room = self.config.max_positions - ids.shape[1]
        settings = dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, room))
        length = ids.shape[1] + settings.max_new_tokens
        step = lm_step(self.model)
        if compile:
            if self.device.type != "cuda" or cache != "static":
                raise InputError("compile=True needs a CUDA device and cache='static'")
            step = torch.compile(step, dynamic=True)
        if cache == "graph":
            return step, self._fixed_cache(self.model, ids.shape[0], length), settings, ids, mask
        kv = self.model.new_cache(ids.shape[0], length if cache == "static" else None)
        return step, kv, settings, ids, mask

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        cache: CacheKind = "static",
        compile: bool = False,
    ) -> str | list[str]:
        """Return the new text for one prompt (a str or a conversation), or a list for a batch of them.

        temperature 0 is greedy; otherwise tokens are drawn at that temperature after top_k / top_p filtering,
        reproducibly for a given `seed`. A sequence ends at an end token, before the first `stop` string, after
        max_new_tokens, or when the context is full. `cache="static"` preallocates the KV cache, "dynamic"
        grows it, "graph" decodes with fixed shapes, replaying each step as a CUDA graph on a GPU and reading
        the device back only every 16 steps (mmlm.inference.graph_decode); all three give the same tokens.
        `compile=True` (CUDA only, cache="static") runs the steps through torch.compile.
        """
        texts, one, chat = self.prompt_texts(prompt)
        settings = generation_settings(max_new_tokens, temperature, top_k, top_p, stop, seed)
        prepared = self.prepare(texts, chat, settings, cache, compile)
        outputs = self._generate_texts(prepared, drop_finished=not compile)
        return outputs[0] if one else outputs

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        cache: CacheKind = "static",
    ) -> Iterator[str]:
        """Yield the new text in pieces as it is generated; the pieces join to what `generate` returns.

        With `cache="graph"` the steps are the graphed fixed-shape ones, and each token is read back as it comes.
        """
        texts, one, chat = self.prompt_texts(prompt)
        if not one:
            raise InputError("stream: expected one prompt (a string or a conversation), not a batch")
        settings = generation_settings(max_new_tokens, temperature, top_k, top_p, stop, seed)
        yield from self._stream_pieces(self.prepare(texts, chat, settings, cache, compile=False))

    def _transformers_folder(
        self, weights: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """Llama, Mistral or Qwen2, preferring the model_type the model was loaded from."""
        model_type = hf_model_type(self.config, prefer=self.source_format)
        if model_type is None:
            return None
        dtype = str(self.dtype).removeprefix("torch.")
        config = dict(lm_config_to_hf(self.config, model_type), dtype=dtype)
        return config, to_theirs(weights, llama_key_map(self.config))

    def _save_files(self, folder: Path) -> None:
        cfg = self.config
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": self.eos_token_ids,
                      "pad_token_id": cfg.pad_token_id}  # fmt: skip
        write_json(folder / "generation_config.json", generation)
        self.tokenizer.save(folder)
        if self.chat_template is not None:  # read back first, before tokenizer_config.json's
            (folder / "chat_template.jinja").write_text(self.chat_template.source, encoding="utf-8")


def lm_tokenizer(folder: Path, cfg: LMConfig) -> HFTokenizer:
    """Return the folder's tokenizer.json tokenizer, or raise InputError if it has none."""
    if not (folder / "tokenizer.json").is_file():
        raise InputError(
            f"{folder}: no tokenizer.json; mmlm reads transformers' fast tokenizers (write one with "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
        )
    return load_tokenizer(folder, context_length=cfg.max_positions)


def generation_eos_ids(folder: Path) -> list[int] | None:
    """Return the end-token ids of a folder's generation_config.json (what transformers' generate stops at)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    eos = read_json_object(path).get("eos_token_id")
    if eos is None:
        return None
    return list(eos) if isinstance(eos, list) else [eos]


def build_cast_per_tensor(
    cfg: LMConfig,
    weights: dict[str, torch.Tensor],
    rules: list[Rule],
    source: str,
    device: torch.device,
    dtype: torch.dtype,
) -> DecoderLM:
    """Return a DecoderLM (eval mode) holding `weights` renamed by `rules` (rename and fused rules), each
    tensor copied straight from the memory-mapped file into its final dtype, device and (on CPU) decode layout.

    The model never exists in the checkpoint's dtype (a 7B fp32 file loads in bf16 with ~14 GB of memory),
    nor twice: there is no intermediate state dict.
    """
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = DecoderLM(cfg)
    if device.type == "cpu":
        # CPU decoding is bound by reading the weights, and this layout reads them faster (same values). On
        # the meta device it only sets strides; each tensor is then allocated with them, never copied again.
        model.prepare_for_inference()
    metas = model.state_dict()
    shapes = {k: v.shape for k, v in metas.items()}
    # The key map's checks (missing, unused, wrong shapes) run on shapes alone: meta tensors cost nothing.
    to_ours({k: torch.empty(v.shape, device="meta") for k, v in weights.items()}, rules, shapes, source)
    ours: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.transpose or rule.their_shape is not None or len(rule.ours) != 1:
            raise ValueError(f"build_cast_per_tensor handles rename and fused rules only, not {rule}")
        parts = [weights[t] for t in rule.theirs]
        target = dtype if parts[0].is_floating_point() else parts[0].dtype
        meta = metas[rule.ours[0]]
        whole = torch.empty_strided(meta.shape, meta.stride(), dtype=target, device=device)
        start = 0
        for part in parts:  # fused q, k, v: stacked along dim 0
            whole[start : start + part.shape[0]].copy_(part)
            start += part.shape[0]
        ours[rule.ours[0]] = whole
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval()


def load_hf_causal_lm(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Return a transformers Llama/Mistral/Qwen2 folder as a CausalLM, weights cast to `dtype` as they are read."""
    cfg = lm_config_from_hf(cfg_json)
    weights = drop_derived(read_weights(folder), cfg)
    model = build_cast_per_tensor(cfg, weights, llama_key_map(cfg), str(folder), device, dtype)
    tokenizer = lm_tokenizer(folder, cfg)
    return CausalLM(
        model,
        tokenizer,
        cfg_json.get("model_type"),
        generation_eos_ids(folder),
        ChatTemplate.from_pretrained(folder),
    )


def load_mmlm_causal_lm(
    folder: Path, cfg_json: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Return an mmlm decoder_lm folder (our config and tensor names) as a CausalLM."""
    cfg, weights, rules = read_mmlm(folder, cfg_json, LMConfig)
    model = build_cast_per_tensor(cfg, weights, rules, str(folder), device, dtype)
    tokenizer = lm_tokenizer(folder, cfg)
    return CausalLM(model, tokenizer, None, generation_eos_ids(folder), ChatTemplate.from_pretrained(folder))
