"""VLM training configuration (`mmlm train vlm`): the model's parts, the LLaVA stages, LoRA, data and run settings.

A run is a list of named stages trained one after another in one process, each with its own trainable parts,
optimiser, schedule and data mix, for example the LLaVA recipe (Liu et al. 2023, §4.2):

    stages:
      align:    {steps: 300, train: [connector], data: {question_types: [caption]}}          # stage 1
      instruct: {steps: 1000, train: [connector, lm], vision_layers: 2, vision_from_step: 200,
                 data: {multimodal_fraction: 0.9, text_source: shapes}}                      # stage 2

Overrides on the command line address stages by name: `stages.instruct.optim.lr=1e-4`.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmlm.data.synthetic.instructions import QUESTION_TYPES
from mmlm.errors import InputError
from mmlm.fusion import ConnectorConfig
from mmlm.models.audio_encoder import AudioConfig
from mmlm.models.config import CONFIG_VERSION, config_from_dict
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.vision import VisionConfig
from mmlm.train.config import OptimConfig, apply_overrides, check_parallel, read_config_file
from mmlm.train.loggers import LogConfig, check_log_config

TRAINABLE_PARTS = ("connector", "lm", "lora", "audio")  # audio: the audio encoder
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class VLMParts:
    """Where the VLM's tower, connector and LM come from: checkpoint folders, or configs to build fresh ones."""

    # a VLM folder (one mmlm loads) to go on from, as a video model starts from an image one: its tower, LM,
    # tokenizer and chat template, and its connector when `connector` is the same; not with vision_init or lm_init
    vlm_init: str | None = None
    vision_init: str | None = None  # a CLIP/SigLIP folder (mmlm or transformers): its vision tower
    lm_init: str | None = None  # a decoder-LM folder (mmlm or transformers): its LM, tokenizer, chat template
    vision: VisionConfig = field(
        default_factory=lambda: VisionConfig(
            image_size=32, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512, act="gelu", embed_dim=None
        )  # fmt: skip
    )
    lm: LMConfig = field(
        default_factory=lambda: LMConfig(
            width=128, layers=2, heads=4, kv_heads=4, mlp_dim=384, tie_word_embeddings=True
        )  # fmt: skip
    )  # vocab size, special ids and max_positions come from the tokenizer and `max_length`
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    feature_layers: list[int] = field(default_factory=lambda: [-2])
    feature_select: str = "default"  # default: drop the first (class) token | full: keep every token
    tokenizer: str | None = (
        None  # a folder with tokenizer.json; None without lm_init: train a BPE on the data
    )
    vocab_size: int = 1024  # of a trained BPE
    # an audio tower (optional): a Whisper folder (transformers or mmlm audio_encoder), or a config to build fresh
    audio_init: str | None = None
    audio: AudioConfig | None = None
    audio_connector: ConnectorConfig = field(default_factory=ConnectorConfig)  # "connector" trains it too
    audio_pool: int = 4  # encoder frames merged per audio token
    audio_pool_mode: str = "mean"  # mean | stack
    video_pool: int = 1  # a video's consecutive frames per image slot (see VLMConfig)
    video_merge: str = "mean"  # mean | resampler (a perceiver connector with max_frames >= video_pool)


@dataclass
class StageData:
    """One stage's data: a multimodal source mixed with text-only data, a fraction α of samples multimodal."""

    source: str = "shapes"  # "shapes", or a LLaVA conversations JSON/JSONL file
    image_folder: str | None = None  # images of a conversations file (default: the file's folder)
    video_frames: int = 8  # frames sampled uniformly from each video of a conversations file
    question_types: list[str] | None = None  # shapes: which question types (None: all); [caption] to align
    samples: int = 20_000  # shapes: generated training samples
    turns: int = 1  # shapes: questions per image, asked as one multi-turn conversation
    text_source: str | None = None  # "shapes" (templated sentences), a .txt file (one text a line), or a
    # conversations file without images; None: no text-only data
    text_samples: int = 20_000  # shapes: sentences generated
    multimodal_fraction: float = 1.0  # α: the probability that a sample is multimodal, else text-only


@dataclass
class DataLoading:
    """How every stage's samples are encoded: in `workers` DataLoader worker processes (0: in the trainer)."""

    workers: int = 2  # decoding, preprocessing and tokenising off the training process; 2 suits a CPU run
    timeout: float = 300.0  # seconds a worker may take for one batch before the run stops (0: no limit)
    # batches drawn at once and cut by length into batches of similar samples (less padding); 1: off
    group_by_length: int = 1
    pack: bool = False  # several samples per row up to max_length, each attending to itself only


@dataclass
class StageConfig:
    """One training stage: what trains (connector, lm or lora), for how long, on what, with what optimiser."""

    steps: int = 100
    train: list[str] = field(default_factory=lambda: ["connector"])
    vision_layers: int = 0  # unfreeze the last N ViT blocks feeding the connector (all: whole tower) ...
    vision_from_step: int = 0  # ... from this step of the stage on
    vision_lr_scale: float = 1.0  # the unfrozen tower's learning rate, relative to optim.lr
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=10)
    )
    data: StageData = field(default_factory=StageData)


@dataclass
class LoRAConfig:
    """LoRA on the LM's linear layers for stages that train `lora`; merged into the weights after the stage."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | str = field(default_factory=lambda: ["q", "k", "v", "out", "gate", "up", "down"])
    dropout: float = 0.0
    rslora: bool = False
    save_adapter: bool = (
        False  # also write the adapter in PEFT format (<out_dir>/adapter-<stage>) before merging
    )


def default_stages() -> dict[str, StageConfig]:
    """Return LLaVA's two stages: align the connector on captions, then tune connector + LM on instructions."""
    return {
        "align": StageConfig(steps=100, train=["connector"], data=StageData(question_types=["caption"])),
        "instruct": StageConfig(steps=300, train=["connector", "lm"],
                                optim=OptimConfig(lr=5e-4, weight_decay=0.0, warmup_steps=20)),
    }  # fmt: skip


@dataclass
class VLMTrainConfig:
    """One VLM training run: parts, stages in order, LoRA, and run-wide settings."""

    model: VLMParts = field(default_factory=VLMParts)
    stages: dict[str, StageConfig] = field(default_factory=default_stages)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataLoading = field(default_factory=DataLoading)
    batch_size: int = 32  # per process
    max_length: int = 128  # tokens per sample (image tokens included); longer samples are cut or dropped
    holdout_fraction: float = 0.25  # shapes: colour×shape pairs kept out of training
    eval_samples: int = 200  # shapes: test questions answered for VQA accuracy (0: none)
    eval_every: int = 0  # 0: only at the end
    seed: int = 0
    out_dir: str = "runs/vlm"
    log_every: int = 10
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard / W&B beside metrics.jsonl
    checkpoint_every: int = 0  # 0: no checkpoints (the model is written at the end)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    parallel: str = "ddp"  # under torchrun: ddp (a full copy per rank) | fsdp (sharded, mmlm.train.sharding)
    # recompute each ViT and LM block's activations in backward: less memory, about one more forward pass
    grad_checkpointing: bool = False
    device: str = "auto"
    # token: the mean over the batch's answer tokens (LLaVA); sample: each sample's mean, then their mean, so a
    # one-word answer weighs as much as a long caption
    loss_average: str = "token"
    version: int = CONFIG_VERSION  # of this layout, written to the run's config.json

    @property
    def total_steps(self) -> int:
        """Return the optimiser steps of all stages together."""
        return sum(s.steps for s in self.stages.values())


def _positive(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{where}: expected a positive integer, got {value!r}")


def _number(value: Any, where: str, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise InputError(f"{where}: expected a number in {bounds}, got {value!r}")


def check_stage(name: str, stage: StageConfig) -> None:
    """Raise InputError, naming the field, for a stage setting that cannot be used."""
    where = f"stages.{name}"
    _positive(stage.steps, f"{where}.steps")
    parts = stage.train
    if not isinstance(parts, list) or not parts or any(p not in TRAINABLE_PARTS for p in parts):
        raise InputError(
            f"{where}.train: expected a non-empty list of {list(TRAINABLE_PARTS)}, got {parts!r}"
        )
    if "lm" in parts and "lora" in parts:
        raise InputError(f"{where}.train: choose 'lm' (full fine-tuning) or 'lora', not both")
    if not isinstance(stage.vision_layers, int) or stage.vision_layers < 0:
        raise InputError(f"{where}.vision_layers: expected an integer >= 0, got {stage.vision_layers!r}")
    if not isinstance(stage.vision_from_step, int) or not 0 <= stage.vision_from_step < stage.steps:
        raise InputError(
            f"{where}.vision_from_step: expected a step in [0, {stage.steps}), got {stage.vision_from_step!r}"
        )
    _number(stage.optim.lr, f"{where}.optim.lr", 0, float("inf"), low_open=True)
    _number(stage.optim.weight_decay, f"{where}.optim.weight_decay", 0, float("inf"))
    _number(stage.vision_lr_scale, f"{where}.vision_lr_scale", 0, float("inf"), low_open=True)
    if stage.optim.grad_clip is not None:
        _number(stage.optim.grad_clip, f"{where}.optim.grad_clip", 0, float("inf"))
    if not isinstance(stage.optim.warmup_steps, int) or stage.optim.warmup_steps < 0:
        raise InputError(
            f"{where}.optim.warmup_steps: expected an integer >= 0, got {stage.optim.warmup_steps!r}"
        )
    _positive(stage.optim.accumulation, f"{where}.optim.accumulation")
    data = stage.data
    alpha = data.multimodal_fraction
    _number(alpha, f"{where}.data.multimodal_fraction", 0, 1)
    if alpha < 1 and not data.text_source:
        raise InputError(f"{where}.data.text_source: needed when multimodal_fraction < 1 (got {alpha})")
    if data.question_types is not None and (
        not isinstance(data.question_types, list) or not set(data.question_types) <= set(QUESTION_TYPES)
    ):
        raise InputError(
            f"{where}.data.question_types: expected a list of {list(QUESTION_TYPES)}, got {data.question_types!r}"
        )
    for key in ("source", "text_source"):
        path = getattr(data, key)
        if path not in (None, "shapes") and not Path(path).is_file():
            raise InputError(f"{where}.data.{key}: {path} not found; expected 'shapes' or a file")
    _positive(data.samples, f"{where}.data.samples")
    _positive(data.turns, f"{where}.data.turns")
    _positive(data.video_frames, f"{where}.data.video_frames")
    _positive(data.text_samples, f"{where}.data.text_samples")


def check_config(cfg: VLMTrainConfig) -> None:
    """Raise InputError, naming the field, for any setting that cannot be used."""
    if not cfg.stages:
        raise InputError("stages: expected at least one stage")
    for name, stage in cfg.stages.items():
        check_stage(name, stage)
    _positive(cfg.batch_size, "batch_size")
    _positive(cfg.max_length, "max_length")
    _positive(cfg.log_every, "log_every")
    check_log_config(cfg.log)
    if not isinstance(cfg.data.workers, int) or isinstance(cfg.data.workers, bool) or cfg.data.workers < 0:
        raise InputError(f"data.workers: expected an integer >= 0, got {cfg.data.workers!r}")
    _number(cfg.data.timeout, "data.timeout", 0, float("inf"))
    group = cfg.data.group_by_length
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise InputError(f"data.group_by_length: expected batches per pool, an integer >= 1, got {group!r}")
    if not isinstance(cfg.data.pack, bool):
        raise InputError(f"data.pack: expected true or false, got {cfg.data.pack!r}")
    for key in ("eval_samples", "eval_every", "checkpoint_every"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 0:
            raise InputError(f"{key}: expected an integer >= 0, got {value!r}")
    if cfg.precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {list(PRECISIONS)}, got {cfg.precision!r}")
    check_parallel(cfg.parallel)
    if not isinstance(cfg.grad_checkpointing, bool):
        raise InputError(f"grad_checkpointing: expected true or false, got {cfg.grad_checkpointing!r}")
    if cfg.loss_average not in ("token", "sample"):
        raise InputError(f"loss_average: expected 'token' or 'sample', got {cfg.loss_average!r}")
    _number(cfg.holdout_fraction, "holdout_fraction", 0, 0.75)
    if any("lora" in s.train for s in cfg.stages.values()):
        lora = cfg.lora
        _positive(lora.rank, "lora.rank")
        if not lora.alpha > 0 or not 0 <= lora.dropout < 1:
            raise InputError(
                f"lora: expected alpha > 0 and dropout in [0, 1), got {lora.alpha}, {lora.dropout}"
            )
    if cfg.model.vlm_init is not None and (cfg.model.vision_init or cfg.model.lm_init):
        raise InputError(
            "model.vlm_init: the VLM brings its own tower and LM; leave vision_init and lm_init unset"
        )
    for key in ("vlm_init", "vision_init", "lm_init", "tokenizer"):
        path = getattr(cfg.model, key)
        if path is not None and not Path(path).is_dir():
            raise InputError(f"model.{key}: {path} is not a folder")


def vlm_config_from_dict(data: dict[str, Any]) -> VLMTrainConfig:
    """Return the VLMTrainConfig of plain data (stages as a mapping of name -> stage settings), checked."""
    data = copy.deepcopy(data)
    stages = data.pop("stages", None)
    if stages is None:
        stages = {name: dataclasses.asdict(s) for name, s in default_stages().items()}
    if not isinstance(stages, dict) or not all(isinstance(s, dict) for s in stages.values()):
        raise InputError("stages: expected a mapping of stage name -> stage settings")
    try:
        cfg = config_from_dict(VLMTrainConfig, data)
        cfg.stages = {str(name): config_from_dict(StageConfig, s) for name, s in stages.items()}
    except TypeError as e:  # a section given as a value, or a value given as a section
        raise InputError(f"training config: {e}") from None
    check_config(cfg)
    return cfg


def load_vlm_train_config(path: str | Path | None, overrides: list[str] = ()) -> VLMTrainConfig:
    """Return the VLMTrainConfig in a YAML or JSON file (or the defaults), with key=value overrides applied."""
    data = read_config_file(path) if path is not None else {}
    if "stages" not in data:
        data["stages"] = {name: dataclasses.asdict(s) for name, s in default_stages().items()}
    return vlm_config_from_dict(apply_overrides(data, list(overrides)))
