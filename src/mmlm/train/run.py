"""`mmlm train clip`: build tokenizer, data, model and optimiser from a TrainConfig, train, export, plot."""

import contextlib
import json
import platform
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mmlm
from mmlm.data.audio_pairs import InMemoryAudioPairs, clip_features, read_audio_manifest
from mmlm.data.augment import TrainTransform
from mmlm.data.datasets import PairCollate, PairDataset, PairLoader
from mmlm.data.readers import open_pairs
from mmlm.data.synthetic import shapes
from mmlm.errors import InputError
from mmlm.eval.retrieval import manifest_evaluator
from mmlm.inference.audio import whisper_preprocessor
from mmlm.inference.contrastive import ContrastiveModel
from mmlm.models.dual_encoder import DualEncoder
from mmlm.processing.bpe import train_bpe
from mmlm.processing.image import ImageProcessor, PixelNormalize
from mmlm.processing.tokenizer import HFTokenizer, TextTokenizer, load_tokenizer
from mmlm.train.checkpoint import find_checkpoint
from mmlm.train.config import DataConfig, TrainConfig, config_dict
from mmlm.train.distributed import DistInfo, cleanup, init_distributed
from mmlm.train.loop import train
from mmlm.train.memory_data import InMemoryPairs
from mmlm.train.plots import plot_training
from mmlm.train.sharding import check_launch


def shapes_pairs(cfg: DataConfig, image_size: int, seed: int) -> list[tuple[Any, str]]:
    """Return the generated shapes-world training pairs (image, caption); held-out colour×shape pairs excluded.

    A share of the scenes (`shapes_colourless`) is shown in greyscale (or, with `shapes_colourless_view`
    "unnamed", in colours that no word names) with the colour words dropped from its caption ("a large star at
    the top"), so a shape is learnt apart from the colours it was seen in: without it, the tower learns each seen
    colour×shape pair as a whole and calls a held-out green hexagon a green circle. A share of one-object scenes
    can instead be captioned by colour or shape alone (`shapes_partial_captions`, "a red shape", "a star"; off by
    default, as it lifted held-out zero-shot less).
    """
    train_pairs, _ = shapes.split_combinations(seed, holdout_fraction=0.25)
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(cfg.shapes_samples):
        max_objects = 1 if rng.random() < cfg.shapes_single_object else 3
        s = shapes.make_sample(i, seed + 1, pairs=train_pairs, image_size=image_size, max_objects=max_objects)
        image, text = s.image, s.caption
        if len(s.scene.objects) == 1 and rng.random() < cfg.shapes_partial_captions:
            o = s.scene.objects[0]
            text = str(
                rng.choice(
                    [f"a {o.color} shape", f"a {o.shape}", f"a {o.size} {o.shape}", f"something {o.color}"]
                )
            )
        elif rng.random() < cfg.shapes_colourless:
            image, text = shapes.colourless(s.scene, text, image_size, rng, cfg.shapes_colourless_view)
        out.append((image, text))
    return out


class LoaderStream:
    """An endless stream of (pixels, ids) batches over a PairLoader's epochs, resumable through its state."""

    def __init__(self, loader: PairLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for batch in self.loader:
                yield batch.pixels, batch.tokens

    def state_dict(self) -> dict[str, Any]:
        """Return the loader's resume state."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the loader."""
        self.loader.load_state_dict(state)


def build_tokenizer(cfg: TrainConfig, run_dir: Path, captions: Iterator[str]) -> TextTokenizer:
    """Return the configured tokenizer, or a byte-level BPE trained on the captions."""
    text = cfg.model.text
    if cfg.tokenizer is not None:
        return load_tokenizer(Path(cfg.tokenizer), text.context_length, text.padding)
    folder = train_bpe(captions, run_dir / "tokenizer", cfg.vocab_size, text.context_length)
    return HFTokenizer(folder, context_length=text.context_length)


def build_audio_data(cfg: TrainConfig, run_dir: Path, dist: DistInfo, preprocessor: dict[str, Any]):
    """Return (tokenizer, batch stream) of an audio manifest's clips (its `data.split` rows), as log-mels."""
    if cfg.data.source == "shapes":
        raise InputError(
            'data.source: an audio-text model trains on an audio manifest (JSONL rows with "audio" and "text"),'
            " e.g. the spoken set of mmlm.data.synthetic.spoken.make_spoken_set; got the image world 'shapes'"
        )
    clips, captions = read_audio_manifest(cfg.data.source, cfg.data.split)
    texts = [c[0] for c in captions]
    tokenizer = build_tokenizer(cfg, run_dir, iter(texts))
    clips, texts = clips[dist.rank :: dist.world_size], texts[dist.rank :: dist.world_size]
    features = clip_features(clips, cfg.model.audio, preprocessor)
    return tokenizer, InMemoryAudioPairs(features, tokenizer(texts), cfg.batch_size, cfg.seed)


def build_data(cfg: TrainConfig, run_dir: Path, dist: DistInfo, processor: ImageProcessor):
    """Return (tokenizer, batch stream) for the configured data: uint8 pixels resized and cropped as `processor`
    does (or augmented), normalised later on the device."""
    size = cfg.model.vision.image_size
    if cfg.data.source == "shapes":
        pairs = shapes_pairs(cfg.data, size, cfg.seed)
        tokenizer = build_tokenizer(cfg, run_dir, (t for _, t in pairs))
        pairs = pairs[dist.rank :: dist.world_size]
        ids = tokenizer([t for _, t in pairs])
        images = [p for p, _ in pairs]
        pin = torch.cuda.is_available()
        return tokenizer, InMemoryPairs(images, ids, processor, cfg.batch_size, cfg.seed, pin_memory=pin)
    options = {
        k: v for k in ("image_column", "text_column", "image_root", "split") if (v := getattr(cfg.data, k))
    }
    reader = open_pairs(cfg.data.source, cfg.data.format, **options)
    tokenizer = build_tokenizer(cfg, run_dir, (c for pair in reader for c in pair.captions))
    transform = TrainTransform(size=size, scale=tuple(cfg.data.crop_scale), flip=cfg.data.flip)
    dataset = PairDataset(reader, transform, seed=cfg.seed, batch_size=cfg.batch_size, rank=dist.rank,
                          world_size=dist.world_size)  # fmt: skip
    loader = PairLoader(dataset, num_workers=cfg.data.workers, collate=PairCollate(tokenizer),
                        pin_memory=torch.cuda.is_available(), drop_last=True)  # fmt: skip
    return tokenizer, LoaderStream(loader)


def run_info() -> dict[str, Any]:
    """Return the git commit and package versions, written beside every run."""
    try:
        root = Path(__file__).resolve().parents[3]
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    versions = {}
    for name in ("mmlm", "torch", "numpy", "tokenizers", "safetensors", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"git_commit": commit or None, "python": platform.python_version(), "versions": versions}


def run_clip_training(
    cfg: TrainConfig,
    resume: str | None = None,
    evaluate: Callable[[ContrastiveModel, int], dict[str, float]] | None = None,
) -> tuple[ContrastiveModel, list[dict[str, Any]]]:
    """Train a CLIP/SigLIP model (audio-text when `model.audio` is set) as configured; return (the trained model,
    the logged records).

    `evaluate(model, step)` runs every cfg.eval_every steps and at the end; else `val_data` is evaluated.
    """
    dist = init_distributed()
    check_launch(cfg.parallel)
    run_dir = Path(cfg.out_dir)
    if resume:
        find_checkpoint(run_dir, resume)  # a missing checkpoint fails now, not after the data is built
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.init is not None:
        start = mmlm.load(cfg.init)
        cfg = replace(cfg, model=start.config, tokenizer=cfg.tokenizer or cfg.init)
        processor, audio_preprocessor = start.image_processor, start.audio_preprocessor
    elif cfg.model.audio is not None:
        processor, audio_preprocessor = None, whisper_preprocessor(cfg.model.audio)
    else:
        processor, audio_preprocessor = ImageProcessor.clip(cfg.model.vision.image_size), None
    if cfg.model.audio is not None:
        tokenizer, data = build_audio_data(cfg, run_dir, dist, audio_preprocessor)
    else:
        tokenizer, data = build_data(cfg, run_dir, dist, processor)
    if cfg.init is None:
        text = replace(cfg.model.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id)  # fmt: skip
        cfg = replace(cfg, model=replace(cfg.model, text=text))
        model = DualEncoder(cfg.model)
    else:
        model = start.model
    loaded = ContrastiveModel(model, tokenizer, processor, audio_preprocessor)
    if dist.rank == 0:
        (run_dir / "config.json").write_text(json.dumps(config_dict(cfg), indent=2) + "\n")
        (run_dir / "run_info.json").write_text(json.dumps(run_info(), indent=2) + "\n")
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if evaluate is None and cfg.val_data:
        options = {"split": cfg.val_split} if cfg.val_split else {}
        evaluate = manifest_evaluator(cfg.val_data, cfg.val_samples, **options)
    hook = (lambda _, step: evaluate(loaded, step)) if evaluate else None
    normalize = PixelNormalize(processor) if cfg.model.audio is None else None  # the batches' uint8 pixels
    records = train(cfg, model, data, run_dir, resume=resume, evaluate=hook,
                    export=lambda folder: loaded.save_pretrained(folder, format="mmlm"), dist=dist,
                    normalize=normalize)  # fmt: skip
    skipped = getattr(getattr(data, "loader", None), "skipped", None)
    if skipped and dist.rank == 0:
        print(f"skipped {sum(skipped.values())} corrupt samples: {dict(skipped)}")
    if dist.rank == 0:
        loaded.save_pretrained(run_dir / "model")
        plot_training(records, run_dir)
    cleanup()
    return loaded, records
