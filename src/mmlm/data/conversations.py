"""The LLaVA conversations format: read it into chat messages, write it back, and serve it to a VLM processor.

A file is a JSON list, or JSONL with one record per line:
    {"id": ..., "image": "rel/path.png" | ["a.png", "b.png"] (optional), "audio": "clip.wav" | [...] (optional),
     "video": "clip.mp4" | [...] (optional),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "a cat"}]}
Image paths are relative to `image_folder` (default: the file's folder). Each `<image>` placeholder in the
values stands for the next image of the record, so their counts must agree; so does each `<audio>` for the next
audio clip and each `<video>` for the next video (paths relative to the same folder). A video is a file, or a list
of its frames' image files in order (frames already extracted), e.g. "video": [["f0.png", "f1.png", ...]].
"""

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows, parse_json, read_text
from mmlm.processing.chat import AUDIO_TOKEN, IMAGE_TOKEN, Message
from mmlm.processing.video_prompt import VIDEO_TOKEN, expand_videos, frame_sampler
from mmlm.processing.vlm_processor import EncodedSample, VLMProcessor

# LLaVA / ShareGPT speaker names -> chat roles
ROLE_OF_SPEAKER = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SPEAKER_OF_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    """One record: chat messages (string content with `<image>` placeholders) and its image paths, in order."""

    messages: list[Message]
    images: list[Path]
    id: str | None = None
    audio: list[Path] = field(default_factory=list)
    videos: list[Path | list[Path]] = field(default_factory=list)  # a file, or its frames' files


def _records(path: Path) -> Iterable[tuple[str, Any]]:
    # (where, record): "file record i" (0-based) in a JSON list, "file:n" (line n, 1-based) in JSONL
    text = read_text(path)
    if text.lstrip().startswith("["):
        records = parse_json(text, path)
        yield from ((f"{path} record {i}", record) for i, record in enumerate(records))
        return
    yield from ((f"{path}:{number}", record) for number, record in jsonl_rows(path))


def parse_record(record: Any, where: str, image_folder: Path, image_token: str = IMAGE_TOKEN) -> Conversation:
    """Return one LLaVA record as a Conversation; `where` names it in errors ("file.json record 3")."""
    if not isinstance(record, Mapping):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: conversations: expected a non-empty list of {{'from', 'value'}} turns")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        if speaker not in ROLE_OF_SPEAKER:
            raise InputError(
                f"{where}: conversations[{i}].from: expected one of {sorted(ROLE_OF_SPEAKER)}, got {speaker!r}"
            )
        if not isinstance(turn.get("value"), str):
            raise InputError(f"{where}: conversations[{i}].value: expected a string")
        messages.append({"role": ROLE_OF_SPEAKER[speaker], "content": turn["value"]})
    media = {}
    kinds = (("image", image_token, "image(s)"), ("audio", AUDIO_TOKEN, "audio clip(s)"),
             ("video", VIDEO_TOKEN, "video(s)"))  # fmt: skip
    for key, token, noun in kinds:
        paths = record.get(key, [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(
            _is_path(p) or (key == "video" and _is_frames(p)) for p in paths
        ):
            frames = " (or, for a video, a list of its frame files)" if key == "video" else ""
            raise InputError(f"{where}: {key}: expected a relative path or a list of them{frames}")
        placeholders = sum(m["content"].count(token) for m in messages)
        if placeholders != len(paths):
            raise InputError(f"{where}: {len(paths)} {noun} but {placeholders} {token} placeholder(s)")
        media[key] = [
            [image_folder / f for f in p] if isinstance(p, list) else image_folder / p for p in paths
        ]
    record_id = record.get("id")
    return Conversation(
        messages,
        media["image"],
        None if record_id is None else str(record_id),
        media["audio"],
        media["video"],
    )


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_frames(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_path(f) for f in value)


def read_conversations(
    path: str | os.PathLike, image_folder: str | os.PathLike | None = None, image_token: str = IMAGE_TOKEN
) -> list[Conversation]:
    """Return every record of a LLaVA JSON/JSONL file; InputError names the file and record of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; expected a LLaVA conversations JSON or JSONL file")
    folder = Path(image_folder) if image_folder is not None else path.parent
    return [parse_record(record, where, folder, image_token) for where, record in _records(path)]


def llava_record(
    messages: Sequence[Message], images: Sequence[str] = (), record_id: str | None = None
) -> dict:
    """Return string-content chat messages as one LLaVA record (the inverse of `parse_record`)."""
    record: dict[str, Any] = {} if record_id is None else {"id": record_id}
    if images:
        record["image"] = images[0] if len(images) == 1 else list(images)
    record["conversations"] = [{"from": SPEAKER_OF_ROLE[m["role"]], "value": m["content"]} for m in messages]
    return record


class ConversationDataset(Dataset):
    """Conversations encoded by a VLM processor; an item is None when truncation dropped it (collate counts it)."""

    def __init__(
        self,
        conversations: Sequence[Conversation],
        processor: VLMProcessor,
        frames: int = 8,
        video_pool: int = 1,
    ) -> None:
        self.conversations = conversations
        self.processor = processor
        self.frames, self.video_pool = frames, video_pool

    def __len__(self) -> int:
        """Return the number of conversations."""
        return len(self.conversations)

    def __getitem__(self, index: int) -> EncodedSample | None:
        """Return conversation `index` tokenised with labels and its images preprocessed, or None if dropped."""
        return encode_conversation(self.processor, self.conversations[index], self.frames, self.video_pool)


def encode_conversation(
    processor: VLMProcessor, conversation: Conversation, frames: int = 8, video_pool: int = 1
) -> EncodedSample | None:
    """Return one conversation encoded: its videos sampled to `frames` frames (grouped `video_pool` per slot)."""
    messages, images = conversation.messages, list(conversation.images)
    if conversation.videos:
        read = frame_sampler(frames)

        def sample(video: Path | list[Path]) -> list[Any]:
            # a list holds frames already extracted: used as given, not resampled
            return list(video) if isinstance(video, list) else read(video)

        messages, images = expand_videos(messages, images, conversation.videos, sample, video_pool)
    return processor.encode(messages, images, audio=conversation.audio)
