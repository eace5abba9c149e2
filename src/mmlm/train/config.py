"""Training configuration: a dataclass filled from YAML/JSON and `key=value` overrides on the command line."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmlm.data.synthetic.colours import COLOURLESS_VIEWS
from mmlm.errors import InputError
from mmlm.models.config import CONFIG_VERSION, config_from_dict
from mmlm.models.dual_encoder import DualEncoderConfig
from mmlm.train.loggers import LogConfig, check_log_config


@dataclass
class OptimConfig:
    """AdamW with a warmup + cosine schedule; `accumulation` micro-batches of batch_size make one step.

    Accumulation keeps full-batch negatives (mmlm.train.accumulation, open_clip's accum_freq): the loss sees all
    accumulation × batch_size pairs, as one big batch would, at the cost of one extra no-grad forward per
    micro-batch (about a third more compute per step than plain accumulation) and the cached embeddings.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    max_warmup_fraction: float | None = 0.1  # warmup lasts at most this share of the run; None: warmup_steps
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accumulation: int = 1


@dataclass
class DataConfig:
    """Where training pairs come from: the built-in shapes world, or files (see mmlm.data.readers.open_pairs)."""

    source: str = "shapes"  # "shapes", or a manifest / CSV / TSV / tar shards / COCO JSON / Parquet path
    format: str | None = (
        None  # jsonl | csv | tsv | webdataset | coco | karpathy | parquet; default: by suffix
    )
    image_column: str | None = None  # CSV/TSV/Parquet
    text_column: str | None = None
    image_root: str | None = None  # COCO/Karpathy
    split: str | None = None  # Karpathy; an audio manifest: only rows whose "split" is this
    workers: int = 2
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop area range
    flip: bool = False  # horizontal flips, never applied to captions that say left/right
    shapes_samples: int = 30_000  # size of the generated shapes world
    shapes_single_object: float = 0.5  # share of generated scenes with one object
    shapes_partial_captions: float = 0.0  # share of one-object scenes captioned by colour or shape alone
    # share of the other scenes shown without their named colours, colour words dropped; those scenes in
    # greyscale, or in random colours that no word names ("unnamed": shapes.colourless)
    shapes_colourless: float = 0.3
    shapes_colourless_view: str = "greyscale"


@dataclass
class TrainConfig:
    """One contrastive training run."""

    model: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: str | None = None  # start from this model folder (transformers or mmlm) instead of `model`
    tokenizer: str | None = (
        None  # a folder with tokenizer.json / spiece.model; None: train a BPE on the captions
    )
    vocab_size: int = 1024  # of a trained BPE
    val_data: str | None = None  # a JSONL manifest (or any data.source form) for retrieval evaluation
    val_samples: int = 1000
    val_split: str | None = None  # only val_data rows of this split (an audio manifest's "split"; Karpathy)
    steps: int = 1000
    batch_size: int = 128
    seed: int = 0
    out_dir: str = "runs/clip"
    log_every: int = 10
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard / W&B beside metrics.jsonl
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    lock_image: int | None = (
        None  # None: train; 0: freeze the whole tower; N: freeze all but the last N blocks
    )
    lock_text: int | None = None
    grad_checkpointing: bool = False
    # torch.compile the model's training forward and the loss (open_clip's --torchcompile) with this backend;
    # "aot_eager" traces the same graphs without generating kernels (quick on a CPU, for checks)
    compile: bool = False
    compile_backend: str = "inductor"
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    parallel: str = "ddp"  # under torchrun: ddp (a full copy per rank) | fsdp (sharded, mmlm.train.sharding)
    device: str = "auto"
    version: int = CONFIG_VERSION  # of this layout, written to the run's config.json


PARALLEL = ("ddp", "fsdp")


def check_parallel(value: Any) -> None:
    """Raise InputError unless `value` names a way to train across ranks."""
    if value not in PARALLEL:
        raise InputError(f"parallel: expected one of {list(PARALLEL)}, got {value!r}")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return `data` with dotted `key=value` overrides applied (values parsed as JSON where they parse)."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(value)
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Return the settings in a YAML (.yaml, .yml) or JSON training config file, or raise InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training config {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # both parsers raise their own error types
        raise InputError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings")
    return data


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Return the TrainConfig in a YAML or JSON file (or the defaults), with overrides applied."""
    data: dict[str, Any] = {} if path is None else read_config_file(path)
    cfg = config_from_dict(TrainConfig, apply_overrides(data, list(overrides)))
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError(f"steps and batch_size must be positive, got {cfg.steps} and {cfg.batch_size}")
    if cfg.optim.accumulation < 1:
        raise InputError(f"optim.accumulation: got {cfg.optim.accumulation!r}; expected a positive count")
    fraction = cfg.optim.max_warmup_fraction
    if fraction is not None and not 0 < fraction <= 1:
        raise InputError(f"optim.max_warmup_fraction: got {fraction!r}; expected a share in (0, 1] or null")
    check_parallel(cfg.parallel)
    if (view := cfg.data.shapes_colourless_view) not in COLOURLESS_VIEWS:
        raise InputError(f"data.shapes_colourless_view: got {view!r}; expected 'unnamed' or 'greyscale'")
    check_log_config(cfg.log)  # a missing TensorBoard or W&B package stops the run now, not after the data
    model = cfg.model
    rate = model.vision.patch_dropout
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate < 1:
        raise InputError(f"model.vision.patch_dropout: got {rate!r}; expected a share in [0, 1)")
    if model.audio is not None and model.audio_embed_dim != model.text.embed_dim:
        raise InputError(
            f"model.audio_embed_dim ({model.audio_embed_dim}) must equal model.text.embed_dim "
            f"({model.text.embed_dim}): both towers map to one embedding space"
        )
    if model.audio is not None and model.audio_pool not in ("mean", "map"):
        raise InputError(f"model.audio_pool: got {model.audio_pool!r}; expected 'mean' or 'map'")
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    """Return a dataclass config as plain JSON-ready data."""
    return dataclasses.asdict(cfg)
