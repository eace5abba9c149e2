"""`mmlm study ladder`: where does the demo VLM stop learning? The same LM and questions, three inputs.

  text    the scene spelled out in words (`describe(scene)`) before the question: can the LM answer at all?
  oracle  ground-truth slot features through an MLP connector as image tokens: one one-hot per 3×3 grid cell
          (shape, colour, size), one for the word (word, colour) and one per chart bar (colour, height);
          can the LM read a perfect image encoder?
  tower   a ViT on the rendered pixels (trained with the LM) through the same connector: can it see?

Each rung trains the demo's LM shape (2 layers, width 128) from scratch on the train split's questions and is
scored per question type on the validation split (exact match of the greedy answer tokens, teacher-forced,
which equals greedy decoding of a short answer). The vocabulary is one token per word, so the rungs differ
only in what precedes the question. Captions are left out: they are long and the demo scores them apart.
"""

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlm.data.synthetic import shapes
from mmlm.data.synthetic.instructions import conversation_turns, make_instruction
from mmlm.models.decoder_lm import DecoderLM, LMConfig
from mmlm.models.vision import VisionConfig, VisionTransformer
from mmlm.train.config import OptimConfig
from mmlm.train.optim import build_scheduler

RUNGS = ("text", "oracle", "tower")
LADDER_TYPES = ("count", "color", "relation", "presence", "text", "chart")
SPECIALS = ("<pad>", "<eos>", "<img>", "<unk>")
COLOR_NAMES = list(shapes.COLORS)
CELL_FEATURES = 1 + len(shapes.SHAPES) + len(COLOR_NAMES) + len(shapes.SIZES)  # empty flag first
WORD_FEATURES = len(shapes.WORDS) + len(COLOR_NAMES)
BAR_FEATURES = 1 + len(COLOR_NAMES) + 10  # empty flag, colour, height 0..9
SLOT_FEATURES = 3 + CELL_FEATURES + WORD_FEATURES + BAR_FEATURES  # 3: which kind of slot
SLOTS = 9 + 1 + 4


@dataclass
class LadderConfig:
    """One ladder run: the LM's shape, the budget and the data sizes (shared by every rung)."""

    width: int = 128
    layers: int = 2
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    image_size: int = 32
    patch_size: int = 8
    val_samples: int = 300
    turns: int = 1  # questions per training image (a multi-turn conversation); validation asks one
    seed: int = 0
    types: tuple[str, ...] = LADDER_TYPES  # the question types trained and scored
    # a curriculum: first_steps on first_types alone, then `steps` on `types`
    first_types: tuple[str, ...] = ()
    first_steps: int = 0


class LadderSample(NamedTuple):
    """One image (its scene and pixels), the type of its first question, and its (question, answer) turns."""

    image: Any
    scene: shapes.Scene
    type: str
    turns: tuple[tuple[str, str], ...]


def words(text: str) -> list[str]:
    """Return the word tokens of a templated sentence (punctuation and quotes are tokens of their own)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def oracle_slots(scene: shapes.Scene) -> torch.Tensor:
    """Return the scene's ground-truth slot features [SLOTS, SLOT_FEATURES]: 9 cells, the word, 4 bars."""
    slots = torch.zeros(SLOTS, SLOT_FEATURES)
    cells = {shapes.cell_of(o)[0] * 3 + shapes.cell_of(o)[1]: o for o in scene.objects}
    at = 3
    for c in range(9):
        slots[c, 0] = 1
        obj = cells.get(c)
        if obj is None:
            slots[c, at] = 1
            continue
        slots[c, at + 1 + shapes.SHAPES.index(obj.shape)] = 1
        slots[c, at + 1 + len(shapes.SHAPES) + COLOR_NAMES.index(obj.color)] = 1
        slots[c, at + 1 + len(shapes.SHAPES) + len(COLOR_NAMES) + shapes.SIZES.index(obj.size)] = 1
    at += CELL_FEATURES
    slots[9, 1] = 1
    if scene.word is not None:
        slots[9, at + shapes.WORDS.index(scene.word.word)] = 1
        slots[9, at + len(shapes.WORDS) + COLOR_NAMES.index(scene.word.color)] = 1
    at += WORD_FEATURES
    bars = list(zip(scene.chart.labels, scene.chart.heights, strict=True)) if scene.chart else []
    for b in range(4):
        slots[10 + b, 2] = 1
        if b >= len(bars):
            slots[10 + b, at] = 1
            continue
        slots[10 + b, at + 1 + COLOR_NAMES.index(bars[b][0])] = 1
        slots[10 + b, at + 1 + len(COLOR_NAMES) + bars[b][1]] = 1
    return slots


def pixels_of(samples: list[LadderSample]) -> torch.Tensor:
    """Return the samples' images as [B, 3, H, W] in [-1, 1]."""
    arrays = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples])  # [B, H, W, 3]
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


class LadderModel(nn.Module):
    """The ladder's LM with the rung's prefix: none (text), oracle slots or a ViT, each through an MLP."""

    def __init__(self, rung: str, vocab: int, cfg: LadderConfig) -> None:
        super().__init__()
        self.rung = rung
        lm = LMConfig(vocab_size=vocab, width=cfg.width, layers=cfg.layers, heads=4, kv_heads=4,
                      mlp_dim=2 * cfg.width, tie_word_embeddings=True, max_positions=256)  # fmt: skip
        self.lm = DecoderLM(lm)
        self.tower = None
        features = SLOT_FEATURES
        if rung == "tower":
            vision = VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                                  layers=4, heads=4, mlp_dim=4 * cfg.width, act="gelu", embed_dim=None,
                                  stem="conv")  # fmt: skip
            self.tower, features = VisionTransformer(vision), cfg.width
        self.connector = nn.Sequential(
            nn.Linear(features, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width)
        )

    def prefix(self, samples: list[LadderSample]) -> torch.Tensor | None:
        """Return the image tokens [B, P, D] of the rung (None for text)."""
        if self.rung == "text":
            return None
        if self.rung == "oracle":
            return self.connector(torch.stack([oracle_slots(s.scene) for s in samples]))
        features = self.tower.layer_features(pixels_of(samples), [-1])[0][:, 1:]  # [B, N, D], class token off
        return self.connector(features)

    def forward(self, samples: list[LadderSample], ids: torch.Tensor) -> torch.Tensor:
        """Return logits [B, P + T, V] for the prefix followed by the token ids [B, T]."""
        embeds = self.lm.embed(ids)
        prefix = self.prefix(samples)
        if prefix is not None:
            embeds = torch.cat([prefix, embeds], dim=1)
        return self.lm(inputs_embeds=embeds).logits


def encode(
    samples: list[LadderSample], rung: str, vocab: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return right-padded ids [B, T] and labels [B, T] (-100 except on the answer and <eos>)."""
    rows, labels = [], []
    for s in samples:
        tokens = words(shapes.describe(s.scene)) + ["."] if rung == "text" else []
        answered = [False] * len(tokens)
        for question, answer in s.turns:
            tokens += words(question) + [*words(answer), "<eos>"]
            answered += [False] * len(words(question)) + [True] * (len(words(answer)) + 1)
        ids = [vocab.get(w, vocab["<unk>"]) for w in tokens]
        rows.append(ids)
        labels.append([i if a else -100 for i, a in zip(ids, answered, strict=True)])
    length = max(map(len, rows))
    pad = [r + [vocab["<pad>"]] * (length - len(r)) for r in rows]
    return torch.tensor(pad), torch.tensor([r + [-100] * (length - len(r)) for r in labels])


def answer_loss_and_hits(
    model: LadderModel, samples: list[LadderSample], vocab: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean answer-token loss and, per sample, whether every answer token is the argmax."""
    ids, labels = encode(samples, model.rung, vocab)
    logits = model(samples, ids)[:, -ids.shape[1] :]  # the prefix's positions predict nothing
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    hits = ((logits.argmax(-1) == labels) | (labels == -100)).all(1)
    return loss, hits


def ladder_data(
    cfg: LadderConfig, n_train: int
) -> tuple[list[LadderSample], list[LadderSample], dict[str, int]]:
    """Return train and validation questions (train colour×shape pairs, separate streams) and the vocabulary."""
    pairs, _ = shapes.split_combinations(cfg.seed)

    def make(i: int, split: str, types: tuple[str, ...]) -> Any:
        return make_instruction(i, cfg.seed, split=split, pairs=pairs, image_size=cfg.image_size,
                                type_weights=dict.fromkeys(types, 1.0))  # fmt: skip

    first = cfg.first_steps * cfg.batch_size if cfg.first_types else 0
    train = []
    for i in range(first + n_train):  # the curriculum's first samples, then the others (one index stream)
        types = cfg.first_types if i < first else cfg.types
        s = make(i, "train", types)
        turns = conversation_turns(s, cfg.turns, cfg.seed, i, pairs, types)
        train.append(LadderSample(s.image, s.scene, s.type, turns))
    val = [LadderSample(s.image, s.scene, s.type, ((s.question, s.answer),))
           for s in (make(i, "val", cfg.types) for i in range(cfg.val_samples))]  # fmt: skip
    text = " ".join(f"{shapes.describe(s.scene)} {q} {a}" for s in train for q, a in s.turns)
    vocab = {w: i for i, w in enumerate([*SPECIALS, ".", *sorted(set(words(text)) - {"."})])}
    return train, val, vocab


@torch.no_grad()
def score(model: LadderModel, samples: list[LadderSample], vocab: dict[str, int]) -> dict[str, float]:
    """Return accuracy overall and per question type on `samples`."""
    model.eval()
    by_type: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(samples), 100):
        chunk = samples[start : start + 100]
        _, hits = answer_loss_and_hits(model, chunk, vocab)
        for s, hit in zip(chunk, hits.tolist(), strict=True):
            by_type[s.type].append(hit)
    model.train()
    figures = {t: float(np.mean(v)) for t, v in sorted(by_type.items())}
    figures["all"] = float(np.mean([h for v in by_type.values() for h in v]))
    return figures


def run_rung(rung: str, cfg: LadderConfig, data: tuple[list, list, dict]) -> dict[str, Any]:
    """Train one rung from scratch; return its validation accuracy per type, first/last loss and seconds."""
    train, val, vocab = data
    torch.manual_seed(cfg.seed)
    model = LadderModel(rung, len(vocab), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = cfg.steps + (cfg.first_steps if cfg.first_types else 0)
    sched = build_scheduler(opt, OptimConfig(warmup_steps=cfg.warmup_steps), steps)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        batch = [train[(step * cfg.batch_size + i) % len(train)] for i in range(cfg.batch_size)]
        loss, _ = answer_loss_and_hits(model, batch, vocab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return {"rung": rung, **score(model, val, vocab), "first_loss": losses[0],
            "final_loss": float(np.mean(losses[-20:])), "seconds": round(seconds, 1)}  # fmt: skip


def run_ladder(cfg: LadderConfig, rungs: tuple[str, ...] = RUNGS) -> list[dict[str, Any]]:
    """Run each rung on the same questions and budget; return one row of figures per rung."""
    data = ladder_data(cfg, cfg.steps * cfg.batch_size)
    return [run_rung(rung, cfg, data) for rung in rungs]


def ladder_table(rows: list[dict[str, Any]]) -> str:
    """Return the rows as a Markdown table: validation accuracy per question type, per rung."""
    types = [t for t in LADDER_TYPES if any(t in r for r in rows)]
    head = ["rung", "all", *types, "first loss", "final loss", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["rung"], *(f"{r.get(k, float('nan')):.2f}" for k in ("all", *types))]
        cells += [f"{r['first_loss']:.2f}", f"{r['final_loss']:.3f}", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
