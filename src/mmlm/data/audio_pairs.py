"""Audio-text pairs for contrastive training: a manifest's clips turned into log-mel features once, held in memory.

A manifest is JSONL with one clip per row: {"audio": "rel/path.wav", "text": "red circle"} (paths relative to
the manifest; `text` may be a list, the first caption is trained on), optionally with a "split". The log-mel
features are computed once, as at inference (`mmlm.processing.audio.audio_batch_features`), so a training step does
no FFT. Batches come in the seeded shuffled order of `InMemoryPairs`; the position is the whole resume state.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmlm.errors import InputError
from mmlm.json_files import jsonl_rows
from mmlm.models.audio_encoder import AudioConfig
from mmlm.processing.audio import audio_batch_features


def read_audio_manifest(path: str | Path, split: str | None = None) -> tuple[list[Path], list[list[str]]]:
    """Return (clip paths, captions per clip) of a JSONL audio manifest, keeping only `split` rows if given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: audio manifest not found")
    clips, captions = [], []
    for number, row in jsonl_rows(path):
        text = row.get("text") if isinstance(row, dict) else None
        texts = [text] if isinstance(text, str) else text
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str) or not texts:
            raise InputError(f'{path}:{number}: expected {{"audio": "clip.wav", "text": str | [str, ...]}}')
        if split is not None and row.get("split") != split:
            continue
        clip = path.parent / row["audio"]
        if not clip.is_file():
            raise InputError(f"{clip}: file not found (line {number} of {path})")
        clips.append(clip)
        captions.append([str(t) for t in texts])
    if not clips:
        raise InputError(f"{path}: no audio-text rows" + (f" with split {split!r}" if split else ""))
    return clips, captions


def is_audio_manifest(path: str | Path) -> bool:
    """Return True if `path` is a JSONL manifest whose first row names an "audio" clip."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "audio" in row


def clip_features(
    clips: list[Path], cfg: AudioConfig, preprocessor: dict[str, Any], chunk: int = 64
) -> torch.Tensor:
    """Return the log-mel features [N, n_mels, 2·max_frames] of clips, exactly as inference computes them."""
    return torch.cat(
        [audio_batch_features(clips[i : i + chunk], cfg, preprocessor) for i in range(0, len(clips), chunk)]
    )


class InMemoryAudioPairs:
    """Batch b of epoch e is fixed by (seed, e, b), so a run resumes from the batch count alone."""

    def __init__(self, features: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.features, self.ids, self.batch_size, self.seed = features, ids, batch_size, seed
        self.batches_per_epoch = max(1, len(features) // batch_size)
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, b = divmod(self.position, self.batches_per_epoch)
            order = torch.randperm(
                len(self.features), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self.position += 1
            yield self.features[idx], self.ids[idx]

    def state_dict(self) -> dict[str, Any]:
        """Return the data position."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a saved data position."""
        self.position = state["position"]
