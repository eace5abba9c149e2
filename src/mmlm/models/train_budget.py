"""The training-memory budget: bytes per device of one VLM training step, from its config alone.

Parameters are counted exactly by building the model on the meta device (no memory, no weights); LoRA is added
the same way, so its trainable count is what `apply_lora` makes. The byte formulas, per device:

- states (ZeRO's accounting, Rajbhandari et al. 2020), N parameters, N_t of them trainable:
    fp32:        weights 4N,   gradients 4N_t, AdamW 8N_t (m and v in fp32)
    bf16-mixed:  weights 2N,   gradients 2N_t, AdamW 12N_t (fp32 master weights, m and v)
  DDP replicates all three; FSDP over n devices keeps 1/n of each, plus the one block it gathers to run
  (its full weights, and its full gradients before the reduce-scatter).
- activations (what autograd keeps for backward, per token, a = bytes of an activation: 4 fp32, 2 bf16;
  RMSNorm runs in fp32, as mmlm's does; SDPA is a fused kernel that keeps q, k, v, its output and a logsumexp,
  never the L×L scores), for one Llama block of width h, query width Q, key/value width K, MLP width f:
    full:  2·(4h + 2a·h) + a·(Q + 2K) + a·(Q + K) + 2a·Q + 4a·f
           (norm inputs in fp32 and their outputs; the fused qkv output; rotated q,k; SDPA's output and the
           out-projection's contiguous copy of it; SwiGLU's gate, up, silu(gate) and their product)
    LoRA:  2·4h + a·h + a·(Q + 2K) + a·(Q + K) + 2a·Q + 3a·f + a·r·(slices)
           (frozen linears keep only their weights, so the norm outputs feeding the frozen MLP and the MLP
           product feeding the frozen down projection are not kept; LoRA keeps its inputs and x·Aᵀ)
  and for one ViT block (pre-LayerNorm, GELU MLP), full training only: a·(9h + 2f) per token.
  With gradient checkpointing each block keeps only its input (a·h per token) and one block's full set is
  rebuilt at a time during backward. Outside the blocks: the logits (a·V) and cross-entropy's fp32 log-softmax
  (4V) per token. A frozen vision tower (LoRA) keeps nothing: no gradient flows into it.
"""

from dataclasses import asdict, dataclass

import torch

from mmlm.errors import InputError
from mmlm.models.budget import LMShape, blocks_run
from mmlm.models.vision import VisionConfig

PRECISIONS = ("fp32", "bf16-mixed")
SHARDINGS = ("ddp", "fsdp")
LORA_TARGETS = r"lm\..*\.(q|k|v|out)"  # the LM's attention projections (q, k, v slices of the fused qkv)


@dataclass(frozen=True)
class TrainSetup:
    """One training step's shape: per-device batch, tokens per sample, devices, sharding, LoRA, precision."""

    batch: int
    sequence: int  # LM tokens per sample, image tokens included
    images: int = 1  # images per sample
    devices: int = 1
    sharding: str = "ddp"
    lora_rank: int | None = None
    precision: str = "bf16-mixed"
    grad_checkpointing: bool = False

    def check(self) -> None:
        """Raise InputError naming the first option out of range."""
        for name, value, low in (("--batch-size", self.batch, 1), ("--seq-len", self.sequence, 1),
                                 ("--devices", self.devices, 1), ("--images", self.images, 0)):  # fmt: skip
            if value < low:
                raise InputError(f"{name}: got {value}; expected at least {low}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError(f"--lora-rank: got {self.lora_rank}; expected at least 1")
        if self.sharding not in SHARDINGS:
            raise InputError(f"--sharding: got {self.sharding!r}; expected one of {list(SHARDINGS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision: got {self.precision!r}; expected one of {list(PRECISIONS)}")


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of the model as trained: all, trainable, and the largest block (FSDP's gathered unit)."""

    total: int
    trainable: int
    largest_block: int
    lora_slices_per_layer: int = 0


def count_parameters(vlm_config, lora_rank: int | None = None) -> ParameterCount:
    """Return the parameter counts of the VisionLanguageModel `vlm_config` builds, LoRA added if ranked."""
    from mmlm.layers.lora import LoRALinear, apply_lora
    from mmlm.models.vlm import VisionLanguageModel

    with torch.device("meta"):
        model = VisionLanguageModel(vlm_config)
        slices = 0
        if lora_rank is not None:
            apply_lora(model, lora_rank, 2.0 * lora_rank, LORA_TARGETS)
            layers = max(vlm_config.lm.layers, 1)
            slices = sum(len(m.row_ranges) for m in model.modules() if isinstance(m, LoRALinear)) // layers
    params = list(model.parameters())
    blocks = [m for name, m in model.named_modules() if name.endswith(".blocks") or name.endswith(".layers")]
    largest = max((sum(p.numel() for p in b.parameters()) // max(len(b), 1) for b in blocks), default=0)
    return ParameterCount(
        sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), largest, slices
    )


def lm_block_activation_bytes(lm: LMShape, a: int, lora_rank: int | None, lora_slices: int) -> int:
    """Return the bytes one LM block keeps for backward per token (formula in the module docstring)."""
    h, q, k, f = lm.width, lm.heads * lm.head_dim, lm.kv_heads * lm.head_dim, lm.mlp_dim
    mlp_full = (4 if lm.gated_mlp else 2) * f
    attention = a * (q + 2 * k) + a * (q + k) + 2 * a * q + 4 * lm.heads  # + SDPA's fp32 logsumexp
    if lora_rank is None:
        return 2 * (4 * h + 2 * a * h) + attention + a * mlp_full
    mlp_frozen = (3 if lm.gated_mlp else 1) * f
    return 2 * 4 * h + a * h + attention + a * mlp_frozen + a * lora_rank * lora_slices


def vit_block_activation_bytes(v: VisionConfig, a: int) -> int:
    """Return the bytes one ViT block keeps for backward per token: a·(9h + 2f) (module docstring)."""
    return a * (9 * v.width + 2 * v.mlp_dim)


@dataclass(frozen=True)
class TrainBudget:
    """Bytes per device of one training step, by part, and the counts they come from."""

    parameters: int
    trainable_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    gathered_bytes: int  # FSDP: one block's full weights and gradients, unsharded while it runs
    activations_bytes: int
    activations_checkpointed_bytes: int
    lm_activations_bytes: int  # the blocks alone, without gradient checkpointing
    vision_activations_bytes: int
    logits_bytes: int

    @property
    def states_bytes(self) -> int:
        """Return weights + gradients + optimiser states (+ FSDP's gathered block)."""
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.gathered_bytes

    def total_bytes(self, checkpointed: bool) -> int:
        """Return the step's bytes per device, with or without gradient checkpointing."""
        acts = self.activations_checkpointed_bytes if checkpointed else self.activations_bytes
        return self.states_bytes + acts

    def to_dict(self) -> dict:
        """Return every field plus the totals, for --json."""
        return {**asdict(self), "states_bytes": self.states_bytes, "total_bytes": self.total_bytes(False),
                "total_checkpointed_bytes": self.total_bytes(True)}  # fmt: skip


def plan_training(vlm_config, lm: LMShape, image_tokens: int, setup: TrainSetup) -> TrainBudget:
    """Return the training-memory budget per device of `vlm_config` (LM shape `lm`) for `setup`.

    `image_tokens` is the tokens the vision tower runs per image (patches + class token).
    """
    setup.check()
    counts = count_parameters(vlm_config, setup.lora_rank)
    n, n_t = counts.total, counts.trainable
    mixed = setup.precision == "bf16-mixed"
    a = 2 if mixed else 4
    weights, grads, optim = (2 * n, 2 * n_t, 12 * n_t) if mixed else (4 * n, 4 * n_t, 8 * n_t)
    gathered = 0
    if setup.sharding == "fsdp":
        shards = setup.devices
        weights, grads, optim = -(-weights // shards), -(-grads // shards), -(-optim // shards)
        if shards > 1:
            gathered = a * counts.largest_block * (2 if counts.trainable == counts.total else 1)
    tokens = setup.batch * setup.sequence
    per_lm_block = lm_block_activation_bytes(lm, a, setup.lora_rank, counts.lora_slices_per_layer)
    lm_acts = lm.layers * per_lm_block * tokens
    vit_tokens = setup.batch * setup.images * image_tokens
    vision = vlm_config.vision
    vit_blocks = blocks_run_of(vlm_config)
    per_vit_block = vit_block_activation_bytes(vision, a)
    full_vision = setup.lora_rank is None
    vision_acts = vit_blocks * per_vit_block * vit_tokens if full_vision else 0
    logits = (a + 4) * lm.vocab_size * tokens
    final_norm = (4 + 2 * a) * lm.width * tokens
    acts = lm_acts + vision_acts + logits + final_norm
    # checkpointing: every block's input, plus one block's activations rebuilt during its backward
    ckpt_lm = lm.layers * a * lm.width * tokens + per_lm_block * tokens
    ckpt_vision = (vit_blocks * a * vision.width + per_vit_block) * vit_tokens if full_vision else 0
    ckpt = ckpt_lm + ckpt_vision + logits + final_norm
    return TrainBudget(n, n_t, weights, grads, optim, gathered, acts, ckpt, lm_acts, vision_acts, logits)


def blocks_run_of(vlm_config) -> int:
    """Return the ViT blocks a VLM runs: up to its deepest feature layer (LLaVA's −2 skips the last)."""
    from mmlm.models.budget import Backbone

    return blocks_run(Backbone(vlm_config.vision, None, feature_layers=tuple(vlm_config.feature_layers)))
