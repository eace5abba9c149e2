"""The VLM evaluation runner: generate answers for a task under image probes, parse, score, compare.

Probes ask how much an answer depends on the image:
  - normal:    the sample's own image;
  - blind:     a uniform grey image of the same size (the model still "sees an image", but no content);
  - shuffled:  another sample's image, by a fixed derangement (a random single cycle, Sattolo's algorithm,
               so no sample keeps its own image);
  - text_only: no image at all (mmlm: the prompt without "<image>"), where the backend allows it.
Multimodal gain = normal − blind: what the image content adds. Leakage = blind − text_only: what merely having
an image slot changes; a large value means the blind score is not a clean "no information" floor.

With OCR, the text Tesseract reads from the image the model is shown (grey for blind, another sample's for
shuffled, none for text_only) goes before the question as untrusted data (see `mmlm.processing.ocr`).

Samples may show an audio clip or a video instead (mmlm models only): blind is then one second of silence, or a
uniform grey video; shuffled takes another sample's clip or video of the same kind.
"""

import base64
import binascii
import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mmlm.data.synthetic.videos import write_video
from mmlm.errors import InputError
from mmlm.eval.backends import Audio, Backend, Video
from mmlm.eval.generation_cache import GenerationCache, generation_key, image_digest
from mmlm.eval.metrics import METRICS
from mmlm.eval.parsers import PARSERS
from mmlm.eval.samples import is_inline_image
from mmlm.processing.image import load_image
from mmlm.processing.ocr import ocr_text, with_ocr

PROBES = ("normal", "blind", "shuffled", "text_only")
BLIND_GREY = (128, 128, 128)


def decode_sample_image(value: str, sample_id: str) -> Image.Image:
    """Return a sample's image from a file path, a data URL or bare base64, as RGB."""

    if not is_inline_image(value):
        if not Path(value).is_file():
            raise InputError(f"sample {sample_id}: image file {value} not found")
        return load_image(value)
    header, _, payload = value.partition(",") if value.startswith("data:") else ("", "", value)
    if header and ";base64" not in header:
        raise InputError(f"sample {sample_id}: image data URL is not base64 ({header[:40]!r})")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"sample {sample_id}: image is not valid base64 ({payload[:40]!r}...)") from error
    return load_image(data)


def derangement(n: int, seed: int) -> list[int]:
    """Return a permutation of range(n) with no fixed point (one random cycle, Sattolo 1986); n ≥ 2."""
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i, never i itself: the result is a single n-cycle
        order[i], order[j] = order[j], order[i]
    return order


def _medium(sample: Any) -> str | None:
    return getattr(sample, "medium", "image" if sample.image else None)


def image_sources(samples: Sequence[Any], seed: int) -> dict[int, int]:
    """Return, for the shuffled probe, the index of the sample whose image (or clip, or video) each sample gets:
    a derangement within each medium, so an audio sample always hears another sample's clip."""
    by_kind: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        if kind := _medium(sample):
            by_kind.setdefault(kind, []).append(i)
    if not by_kind:
        raise InputError("the shuffled probe needs at least 2 samples with images, got 0")
    sources: dict[int, int] = {}
    for kind, rows in by_kind.items():
        if len(rows) < 2:
            raise InputError(f"the shuffled probe needs at least 2 samples with {kind}s, got {len(rows)}")
        order = derangement(len(rows), seed)
        sources.update({i: rows[order[k]] for k, i in enumerate(rows)})
    return sources


def primary_metric(summary: dict[str, Any]) -> str:
    """Return the name of a metric summary's headline figure ("primary" if named, else accuracy, else the first)."""
    named = summary.get("primary")
    if isinstance(named, str) and named in summary:
        return named
    if "accuracy" in summary:
        return "accuracy"
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("n", "count"):
            return key
    raise InputError(f"metric summary has no numeric figure: {sorted(summary)}")


BLIND_AUDIO = Audio(np.zeros(16_000, dtype=np.float32))  # one second of silence


class _Images:
    """Loads the images (clips, videos) a probe shows, a batch at a time, with their digests and (optionally) OCR
    text."""

    def __init__(self, samples: Sequence[Any], ocr: bool, cache: GenerationCache | None) -> None:
        self.samples, self.ocr, self.cache = samples, ocr, cache
        self.ocr_texts: dict[str, str] = {}
        self.loaded: dict[int, Image.Image] = {}
        self.file_digests: dict[str, str] = {}
        self.grey_video: Video | None = None

    def own(self, index: int) -> Any:
        sample = self.samples[index]
        if getattr(sample, "audio", None):
            return Audio(sample.audio)
        if getattr(sample, "video", None):
            return Video(sample.video)
        if not sample.image:
            return None
        if index not in self.loaded:
            self.loaded[index] = decode_sample_image(sample.image, sample.id)
        return self.loaded[index]

    def shown(self, probe: str, index: int, sources: dict[int, int]) -> Any:
        if probe == "text_only":
            return None
        if probe == "shuffled":
            return self.own(sources[index]) if index in sources else None
        item = self.own(index)
        if probe == "blind" and item is not None:
            if isinstance(item, Audio):
                return BLIND_AUDIO
            if isinstance(item, Video):
                return self.blind_video()
            return Image.new("RGB", item.size, BLIND_GREY)
        return item

    def blind_video(self) -> Video:
        if self.grey_video is None:  # written once per run: eight grey frames
            path = Path(tempfile.mkdtemp(prefix="mmlm-blind-")) / "grey.mp4"
            self.grey_video = Video(
                str(write_video([Image.new("RGB", (64, 64), BLIND_GREY)] * 8, path, fps=8))
            )
        return self.grey_video

    def digest(self, item: Any) -> str | None:
        """Return the cache digest of what a prompt shows: pixels, file bytes, or the blind stand-in's name."""
        if item is None:
            return None
        if isinstance(item, Image.Image):
            return image_digest(item)
        if item is BLIND_AUDIO:
            return "audio:silence-1s"
        if item == self.grey_video:
            return "video:grey"
        path = str(item.source)
        if path not in self.file_digests:
            self.file_digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return f"{type(item).__name__.lower()}:{self.file_digests[path]}"

    def ocr_of(self, image: Image.Image, digest: str) -> str:
        if digest not in self.ocr_texts:
            text = self.cache.get_ocr(digest) if self.cache is not None else None
            if text is None:
                text = ocr_text(image)
                if self.cache is not None:
                    self.cache.put_ocr(digest, text)
            self.ocr_texts[digest] = text
        return self.ocr_texts[digest]

    def forget(self) -> None:
        self.loaded.clear()


def _generate(
    backend: Backend,
    task: Any,
    samples: Sequence[Any],
    probe: str,
    batch_size: int,
    images: _Images,
    sources: dict[int, int],
    decoding: dict[str, Any],
    cache: GenerationCache | None,
    bar: tqdm,
    stats: dict[str, int],
) -> list[tuple[str, str]]:
    """Return (prompt, answer) per sample under one probe, generating only what the cache lacks."""
    out: list[tuple[str, str]] = []
    for start in range(0, len(samples), batch_size):
        rows = range(start, min(start + batch_size, len(samples)))
        shown = [images.shown(probe, i, sources) for i in rows]
        digests = [images.digest(item) for item in shown]
        prompts = []
        for i, image, digest in zip(rows, shown, digests, strict=True):
            prompt = task.render_prompt(samples[i])
            if images.ocr and isinstance(image, Image.Image):
                prompt = with_ocr(prompt, images.ocr_of(image, digest))
            prompts.append(prompt)
        keys = [
            generation_key(backend.name, task.name, samples[i].id, p, probe, [d] if d else [], decoding)
            for i, p, d in zip(rows, prompts, digests, strict=True)
        ]
        answers = cache.get_many(keys) if cache is not None else {}
        missing = [k for k, key in enumerate(keys) if key not in answers]
        stats["cached"] += len(keys) - len(missing)
        if missing:
            texts = backend.generate(
                [prompts[k] for k in missing],
                [[shown[k]] if shown[k] is not None else [] for k in missing],
                decoding["max_new_tokens"],
                decoding["temperature"],
            )
            stats["generated"] += len(missing)
            fresh = [(keys[k], t, backend.name, task.name, samples[start + k].id, probe)
                     for k, t in zip(missing, texts, strict=True)]  # fmt: skip
            if cache is not None:  # one transaction per batch: an interruption loses at most this batch
                cache.put_many(fresh)
            answers.update((row[0], row[1]) for row in fresh)
        out += [(p, answers[key]) for p, key in zip(prompts, keys, strict=True)]
        images.forget()
        bar.update(len(keys))
        bar.set_postfix(probe=probe, cached=stats["cached"], refresh=False)
    return out


def _score_by_type(
    metric: Callable, summary: dict[str, Any], parsed: list[str], samples: Sequence[Any], key: str
) -> dict[str, dict[str, float]]:
    """Return {type: {"n", key}}: the metric's own "<key>_<type>" figure, else the metric on that type alone."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.type:
            groups.setdefault(str(s.type), []).append(i)
    by_type = {}
    for name in sorted(groups):
        rows = groups[name]
        figure = summary.get(f"{key}_{name}")
        if not isinstance(figure, (int, float)):
            figure = metric([parsed[i] for i in rows], [samples[i] for i in rows])[0][key]
        by_type[name] = {"n": len(rows), key: float(figure)}
    return by_type


def _records(
    task: str, probe: str, samples: Sequence[Any], pairs: list, parsed: list[str], scores: list, sources: dict
) -> list[dict[str, Any]]:
    """Return the samples.jsonl rows of one probe: id, prompt, prediction, parsed answer, score."""
    rows = []
    for i, (s, (prompt, text), p, score) in enumerate(zip(samples, pairs, parsed, scores, strict=True)):
        image_from = samples[sources[i]].id if probe == "shuffled" and i in sources else None
        rows.append({"task": task, "probe": probe, "id": s.id, "type": s.type, "prompt": prompt,
                     "prediction": text, "parsed": p, "score": score, "image_from": image_from})  # fmt: skip
    return rows


def evaluate_vlm(
    backend: Backend,
    task: Any,
    samples: Sequence[Any],
    batch_size: int = 16,
    probes: Sequence[str] = ("normal",),
    ocr: bool = False,
    cache: GenerationCache | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Return one task's metrics per probe (overall and per type), gain, leakage, settings and per-sample records."""

    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise InputError(f"probes: expected some of {list(PROBES)}, got {list(probes)}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if not samples:
        raise InputError(f"task {task.name}: no samples to evaluate")
    if task.parser not in PARSERS:
        raise InputError(
            f"task {task.name}: unknown parser {task.parser!r}; expected one of {sorted(PARSERS)}"
        )
    if task.metric not in METRICS:
        raise InputError(
            f"task {task.name}: unknown metric {task.metric!r}; expected one of {sorted(METRICS)}"
        )
    skipped = {}
    if "text_only" in probes and not getattr(backend, "supports_text_only", True):
        skipped["text_only"] = f"{backend.name} always needs an image"
    probes = [p for p in dict.fromkeys(probes) if p not in skipped]
    parser, metric = PARSERS[task.parser], METRICS[task.metric]
    decoding = {"max_new_tokens": max_new_tokens or task.max_new_tokens, "temperature": temperature}
    sources = image_sources(samples, seed) if "shuffled" in probes else {}
    images = _Images(samples, ocr, cache)
    stats = {"generated": 0, "cached": 0}
    started = time.perf_counter()
    results: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    with tqdm(total=len(probes) * len(samples), desc=task.name, unit="answer", disable=not progress) as bar:
        answered = {p: _generate(backend, task, samples, p, batch_size, images, sources, decoding, cache, bar,
                                 stats) for p in probes}  # fmt: skip
    key = None
    for probe, pairs in answered.items():
        parsed = [parser(answer, s) for (_, answer), s in zip(pairs, samples, strict=True)]
        summary, scores = metric(parsed, list(samples))
        key = key or primary_metric(summary)
        by_type = _score_by_type(metric, summary, parsed, samples, key)
        results[probe] = {"metrics": summary, "by_type": by_type}
        records += _records(task.name, probe, samples, pairs, parsed, scores, sources)
    example = task.render_prompt(samples[0])
    if ocr:
        example = with_ocr(example, "<OCR text of the image>")
    render = getattr(backend, "render", None)
    model_input = render(example, _medium(samples[0])) if render is not None else None
    return {
        "task": task.name,
        "data": task.data,
        "num_samples": len(samples),
        "parser": task.parser,
        "metric": task.metric,
        "primary": key,
        "probes": results,
        **comparisons(results, key),
        "skipped_probes": skipped,
        "prompt_template": task.prompt,
        "example_prompt": example,
        "example_model_input": model_input,
        "decoding": decoding,
        "ocr": ocr,
        "shuffle_seed": seed if "shuffled" in probes else None,
        "generations": stats,
        "seconds": round(time.perf_counter() - started, 2),
        "records": records,
    }


def comparisons(results: dict[str, Any], key: str) -> dict[str, Any]:
    """Return {"gain": normal − blind, "leakage": blind − text_only}, overall and per type (None where not run)."""

    def difference(a: str, b: str) -> dict[str, Any] | None:
        if a not in results or b not in results:
            return None
        overall = float(results[a]["metrics"][key]) - float(results[b]["metrics"][key])
        types = results[a]["by_type"]
        by_type = {t: types[t][key] - results[b]["by_type"][t][key] for t in types}
        return {"all": overall, "by_type": by_type}

    return {"gain": difference("normal", "blind"), "leakage": difference("blind", "text_only")}
