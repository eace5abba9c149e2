"""Data mixing for VLM training: multimodal instruction data and text-only data in a ratio α, by seed.

Each sample of a batch is multimodal with probability α and text-only otherwise (the mix LLaVA-1.5 uses to
keep the LM's language skills, tracked with a loss per modality). Every draw is a function of (seed, rank,
batch number), and each source is read in a fresh seeded permutation per epoch, so a run resumes from the
sampler's small state (batches served, samples drawn per source) and gives the same batches again.

Sources give samples as the VLM processor encodes them (`EncodedSample`), encoded on every draw, in the data
workers of `MixedBatches` (mmlm.train.mixed_batches), and never kept:
    shapes_instructions   the shapes world's instruction data (question types chosen per stage)
    shapes_text           templated sentences about shapes-world scenes (`text_corpus`), labels on all tokens
    text_file             a .txt file, one text per line, labels on all tokens
    conversation_source   a LLaVA conversations JSON/JSONL file (with images, or text-only conversations), read
                          record by record; bad records are skipped and counted by reason
"""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmlm.data.conversation_records import ConversationRecords, encode_record
from mmlm.data.synthetic.instructions import conversation_turns, make_instruction, text_corpus
from mmlm.data.synthetic.world import World
from mmlm.errors import InputError
from mmlm.eval.vqa import question_messages
from mmlm.processing.bpe import EOS
from mmlm.processing.chat import IMAGE_TOKEN, ChatTemplate
from mmlm.processing.vlm_processor import EncodedSample, VLMProcessor
from mmlm.train.mixed_batches import MixedBatches
from mmlm.train.vlm_config import StageData

MULTIMODAL, TEXT = "multimodal", "text"


class EncodedSource:
    """`size` samples made by `make(index)` and encoded by the processor on every draw; nothing is kept."""

    def __init__(self, size: int, make: Callable[[int], EncodedSample | None]) -> None:
        if size < 1:
            raise InputError("a data source has no samples")
        self.size, self.make = size, make

    def __len__(self) -> int:
        """Return the number of samples."""
        return self.size

    def __getitem__(self, index: int) -> EncodedSample | None:
        """Return sample `index` encoded (None if truncation dropped it; SampleSkipped for bad data)."""
        return self.make(index)


def shapes_instructions(
    processor: VLMProcessor,
    size: int,
    seed: int,
    pairs: Sequence[tuple[str, str]] | World,
    image_size: int,
    question_types: Sequence[str] | None = None,
    turns: int = 1,
) -> EncodedSource:
    """Return shapes-world instruction samples (train split, the given colour×shape pairs) as a source, each a
    conversation of up to `turns` questions about one image."""
    weights = None if question_types is None else dict.fromkeys(question_types, 1.0)

    def make(index: int) -> EncodedSample | None:
        sample = make_instruction(index, seed, split="train", pairs=pairs, image_size=image_size,
                                  type_weights=weights)  # fmt: skip
        qas = (
            conversation_turns(sample, turns, seed, index, pairs, question_types)
            if turns > 1
            else [(sample.question, sample.answer)]
        )
        messages = [*question_messages(qas[0][0]), {"role": "assistant", "content": qas[0][1]}]
        for question, answer in qas[1:]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return processor.encode(messages, [sample.image])

    return EncodedSource(size, make)


def plain_text_source(processor: VLMProcessor, texts: Sequence[str]) -> EncodedSource:
    """Return texts as a source trained on every token (bos, then the text and eos as labels), as LM pre-training."""
    return EncodedSource(len(texts), lambda i: processor.encode("", answer=texts[i]))


def shapes_text(
    processor: VLMProcessor, size: int, seed: int, pairs: Sequence[tuple[str, str]] | World
) -> EncodedSource:
    """Return `size` templated shapes-world sentences as a text-only source."""
    return plain_text_source(processor, text_corpus(size, seed, pairs=pairs))


def text_file(processor: VLMProcessor, path: str | Path) -> EncodedSource:
    """Return the non-empty lines of a UTF-8 text file as a text-only source."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: expected a readable UTF-8 text file ({e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"{path}: no text lines")
    return plain_text_source(processor, lines)


def conversation_source(
    processor: VLMProcessor,
    path: str | Path,
    image_folder: str | Path | None = None,
    frames: int = 8,
    video_pool: int = 1,
) -> EncodedSource:
    """Return the records of a LLaVA conversations file as a source, each read, with its images, audio and
    videos, when drawn (each video as `frames` frames, `video_pool` per image slot); a bad one raises
    SampleSkipped."""
    records = ConversationRecords(path, image_folder)
    if not len(records):
        raise InputError(f"{path}: no conversations")
    return EncodedSource(len(records), lambda i: encode_record(processor, records, i, frames, video_pool))


class MixingSampler:
    """Batches of (source, index) pairs: each slot multimodal with probability α, else text-only.

    Draws depend only on (seed, rank, batch number) and the per-source counts, which form the resume state.
    """

    def __init__(
        self, sizes: dict[str, int], multimodal_fraction: float, batch_size: int, seed: int, rank: int = 0
    ) -> None:
        self.sizes, self.alpha, self.batch_size = dict(sizes), multimodal_fraction, batch_size
        self.seed, self.rank = seed, rank
        self.position = 0  # batches served
        self.drawn = dict.fromkeys(self.sizes, 0)  # samples drawn per source
        self._orders: dict[str, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)

    def _order(self, source: str, epoch: int) -> np.ndarray:
        if self._orders.get(source, (None,))[0] != epoch:
            stream = 0 if source == MULTIMODAL else 1
            rng = np.random.default_rng([self.seed, self.rank, stream, epoch])
            self._orders[source] = (epoch, rng.permutation(self.sizes[source]))
        return self._orders[source][1]

    def next_batch(self) -> list[tuple[str, int]]:
        """Return the next batch as (source, sample index) pairs."""
        rng = np.random.default_rng([self.seed, self.rank, 2, self.position])
        multimodal = rng.random(self.batch_size) < self.alpha
        self.position += 1
        batch = []
        for is_multimodal in multimodal:
            source = MULTIMODAL if is_multimodal else TEXT
            if source not in self.sizes:  # α is 0 or 1 and the other source is absent
                source = TEXT if source == MULTIMODAL else MULTIMODAL
            epoch, i = divmod(self.drawn[source], self.sizes[source])
            self.drawn[source] += 1
            batch.append((source, int(self._order(source, epoch)[i])))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Return the resume state: batches served and samples drawn per source."""
        return {"position": self.position, "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`."""
        self.position, self.drawn = state["position"], dict(state["drawn"])


ROW_MODALITIES = ("image", "audio", "text")


def row_modalities(batch: dict[str, Any]) -> torch.Tensor:
    """Return each row's modality as an index into ROW_MODALITIES [B]: audio if it has a clip, else image if it
    has an image, else text."""
    kind = torch.full_like(batch["images_per_sample"], ROW_MODALITIES.index("text"))
    kind[batch["images_per_sample"] > 0] = ROW_MODALITIES.index("image")
    kind[batch["audio_per_sample"] > 0] = ROW_MODALITIES.index("audio")
    return kind


def stage_batches(
    data: StageData,
    processor: VLMProcessor,
    batch_size: int,
    seed: int,
    pairs: Sequence[tuple[str, str]] | World,
    image_size: int,
    rank: int = 0,
    video_pool: int = 1,
    workers: int = 0,
    timeout: float = 0.0,
    group_by_length: int = 1,
    pack: bool = False,
) -> MixedBatches:
    """Return the batch stream of one stage: its multimodal source (if α > 0) mixed with its text (if α < 1),
    encoded in `workers` DataLoader workers (0: this process), each allowed `timeout` seconds a batch; drawn
    `group_by_length` batches at a time and grouped by length, and with `pack`, packed into rows."""
    sources: dict[str, EncodedSource] = {}
    if data.multimodal_fraction > 0:
        sources[MULTIMODAL] = (
            shapes_instructions(
                processor, data.samples, seed, pairs, image_size, data.question_types, data.turns
            )
            if data.source == "shapes"
            else conversation_source(processor, data.source, data.image_folder, data.video_frames, video_pool)
        )
    if data.multimodal_fraction < 1:
        if data.text_source == "shapes":
            sources[TEXT] = shapes_text(processor, data.text_samples, seed, pairs)
        elif Path(data.text_source).suffix == ".txt":
            sources[TEXT] = text_file(processor, data.text_source)
        else:
            sources[TEXT] = conversation_source(processor, data.text_source)
    sizes = {name: len(source) for name, source in sources.items()}
    sampler = MixingSampler(sizes, data.multimodal_fraction, batch_size * group_by_length, seed, rank)
    return MixedBatches(sources, sampler, processor, workers, timeout, group_by_length, pack)


def corpus_texts(
    stages: Iterable[StageData], seed: int, pairs: Sequence[tuple[str, str]] | World, per_source: int = 4000
) -> list[str]:
    """Return text for training a tokenizer: the stages' conversations as the LLaVA v1 template writes them
    (so "USER:" and "ASSISTANT:" become few tokens), their text-only sentences and conversations."""
    template = ChatTemplate.llava_v1(EOS)

    def rendered(messages: Sequence[dict[str, Any]]) -> str:
        return template.render_text(messages).replace(IMAGE_TOKEN, "").replace(EOS, "")

    texts = []
    for data in stages:
        if data.multimodal_fraction > 0 and data.source == "shapes":
            weights = None if data.question_types is None else dict.fromkeys(data.question_types, 1.0)
            for index in range(min(data.samples, per_source)):
                sample = make_instruction(index, seed, pairs=pairs, image_size=16, type_weights=weights)
                texts.append(rendered([*question_messages(sample.question),
                                       {"role": "assistant", "content": sample.answer}]))  # fmt: skip
        elif data.multimodal_fraction > 0:
            texts += [
                rendered(c.messages)
                for c in ConversationRecords(data.source, data.image_folder).conversations()
            ]
        if data.multimodal_fraction < 1 and data.text_source == "shapes":
            texts += text_corpus(min(data.text_samples, per_source), seed, pairs=pairs)
        elif data.multimodal_fraction < 1 and Path(data.text_source).suffix == ".txt":
            texts += Path(data.text_source).read_text(encoding="utf-8").splitlines()
        elif data.multimodal_fraction < 1:
            texts += [rendered(c.messages) for c in ConversationRecords(data.text_source).conversations()]
    return texts
