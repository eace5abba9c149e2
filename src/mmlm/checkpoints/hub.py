"""Hub ids as users type them: "org/name" (at a revision) names the snapshot of that repository's files in the
Hugging Face cache, downloaded there first when it is missing and the network allows.

huggingface_hub does the work, with its own cache layout and settings (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE, HF_TOKEN), so transformers, `hf download` and mmlm share one cache. The cache is tried first
(`local_files_only`), so a cached model loads without the network; only the files mmlm reads are fetched.
huggingface_hub is imported only when a name is not a folder: its import (~150 ms, `python -X importtime`) is
not paid by the common case, a local folder.
"""

import re
from collections.abc import Sequence
from pathlib import Path

from mmlm.errors import InputError

# Every file mmlm reads from a checkpoint folder. The rest of a repository (pickled or ONNX weights, GGUF, a
# second "consolidated" copy of the weights, README images) is never downloaded.
MODEL_FILES = (
    "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "open_clip_config.json", "open_clip_model.safetensors",
    "adapter_config.json", "adapter_model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "spiece.model",
    "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
SETTINGS_FILES = tuple(name for name in MODEL_FILES if "safetensors" not in name)  # all but the weights
CONFIG_FILES = ("config.json", "open_clip_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "open_clip_model.safetensors")

# the shape of "org/name" (an organisation is required, so a mistyped relative folder "name" is never looked
# up); huggingface_hub's validate_repo_id has the last word
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_folder(path: str | Path, revision: str | None = None, files: Sequence[str] = MODEL_FILES) -> Path:
    """Return the folder `path` names: a folder as given, or the cached (else downloaded) snapshot of the hub
    id "org/name" at `revision` (default: main), holding those of `files` (glob patterns) the repository has."""
    folder = Path(path)
    if folder.is_dir():
        if revision is not None:
            raise InputError(f"revision {revision}: {folder} is a folder; a revision applies to hub ids only")
        return folder
    if not (isinstance(path, str) and HUB_ID.fullmatch(path)):
        raise InputError(f"model folder {folder} not found")
    return _snapshot(path, revision, list(files))


def _missing(folder: Path, files: list[str]) -> str | None:
    # A snapshot that huggingface_hub cannot check (no cached file listing: filled file by file by
    # hf_hub_download or transformers) may lack what mmlm needs; it is then completed when the network allows.
    needed = [CONFIG_FILES] + ([WEIGHT_FILES] if "model.safetensors" in files else [])
    for group in needed:
        if not any((folder / name).is_file() for name in group):
            return " or ".join(group)
    return None


def _snapshot(repo_id: str, revision: str | None, files: list[str]) -> Path:
    from huggingface_hub import constants, errors, snapshot_download

    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE}) at revision {revision or 'main'}"
    try:
        local = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=files, local_files_only=True)
        )
    except errors.HFValidationError:  # e.g. "a--b/c" or "a/b..c": not a repo id either
        raise InputError(f"model folder {repo_id} not found") from None
    except errors.LocalEntryNotFoundError as error:
        incomplete = isinstance(error, getattr(errors, "IncompleteSnapshotError", ()))
        cached = ("incomplete in " if incomplete else "not in ") + where
    else:
        missing = _missing(local, files)
        if missing is None:
            return local
        cached = f"incomplete in {where} (no {missing})"
    if constants.HF_HUB_OFFLINE:
        raise InputError(
            f"model {repo_id}: not a folder; {cached}; download failed: downloads are off (HF_HUB_OFFLINE=1)"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except Exception as error:  # the network's failures are many; each becomes one line, not a traceback
        reason = _download_failure(error, repo_id, revision, constants.ENDPOINT, errors)
    raise InputError(f"model {repo_id}: not a folder; {cached}; download failed: {reason}")


def _download_failure(error: Exception, repo_id: str, revision: str | None, endpoint: str, errors) -> str:
    # most specific first: a GatedRepoError is a RepositoryNotFoundError
    if isinstance(error, errors.GatedRepoError):
        return f"{repo_id} is gated on {endpoint}: accept its terms there and set HF_TOKEN"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"no repository {repo_id} on {endpoint} (or it is private: set HF_TOKEN)"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"no revision {revision} in {repo_id} on {endpoint}"
    if isinstance(error, errors.LocalEntryNotFoundError):  # the hub could not be reached
        cause = error.__cause__
        return f"cannot reach {endpoint} ({type(cause).__name__ if cause else 'connection failed'})"
    if isinstance(error, errors.HfHubHTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} from {endpoint}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
