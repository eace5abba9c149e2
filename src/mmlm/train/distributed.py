"""Distributed contrastive training: torchrun set-up and the CLIP/SigLIP losses across ranks.

Launch with torchrun; on one process everything here falls back to the single-process code path:

    torchrun --nproc_per_node=8 -m mmlm train clip --config FILE                  # one machine, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --master_addr=HOST0 --master_port=29500 -m mmlm train clip --config FILE   # node 0 of 2 (node 1: --node_rank=1)

Loss convention (the same for both losses, and the one open_clip and big_vision use): each rank returns
the loss of its own rows (its local images, and for CLIP also its local texts) averaged over its local batch
n, so the MEAN of the rank losses equals the single-process loss on the concatenated batch of N = W·n pairs.
Gradients reaching a rank's embeddings sum the contributions of every rank's loss, which is W × the
gradient of the single-process loss; DDP's averaging of parameter gradients divides by W again, so the
parameter gradients equal the single-process ones. Every rank must hold the same local batch size n
(use drop_last=True in the sampler). With gradient accumulation (mmlm.train.accumulation) a rank's local batch
is all its K micro-batches, n = K·batch_size, and the convention holds unchanged.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmlm.errors import InputError
from mmlm.train.losses import clip_loss, siglip_loss

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global rank, rank on its node, number of processes, device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(backend: str | None = None) -> DistInfo:
    """Return this process's DistInfo, joining the torchrun process group (nccl on CUDA, gloo on CPU) if launched by torchrun."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # plain `python`: one process, no group
        return DistInfo(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(
            f"distributed launch: environment variables {', '.join(missing)} are not set; "
            "expected all of " + ", ".join(_TORCHRUN_VARIABLES) + " (torchrun sets them)"
        )
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before the first NCCL call, or P2P ops can hang
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size, device)


def is_main() -> bool:
    """Return True on global rank 0, or when not running distributed: the process that logs and saves."""
    return _rank() == 0


def cleanup() -> None:
    """Leave the process group if one was joined; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient for our shard and keeps that shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        shards = [torch.empty_like(x) for _ in range(_world_size())]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards, dim=0)  # [n, ...] -> [W·n, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # ∂(Σ_r L_r)/∂x_local = Σ_r (rank r's gradient w.r.t. the gathered rows that are ours)
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad.chunk(_world_size(), dim=0)[_rank()]  # [W·n, ...] -> [n, ...]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Return the rank-ordered concatenation [W·n, ...] of every rank's x, differentiable w.r.t. the local x.

    A small autograd Function rather than torch.distributed.nn.functional.all_gather, which PyTorch 2.13
    deprecates (its suggested replacement is private) and which has no reduce-scatter on gloo anyway. The
    backward all-reduces the whole gathered gradient and keeps our rows: the same sum a reduce-scatter
    gives, at about twice its traffic, which for [W·n, D] features is small beside DDP's parameter
    all-reduce; it works on every backend and every torch version mmlm supports.
    """
    if _world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def distributed_clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Return this rank's CLIP loss: its local images against all texts and its local texts against all images.

    open_clip's local_loss=True, gather_with_grad=True. With s = exp(logit_scale), local X, Y [n, D],
    gathered X_all, Y_all [W·n, D] and labels r·n + i (rank r's pairs sit at rows r·n … r·n + n - 1):

        L_r = ½ [CE(s·X·Y_allᵀ, r·n + i) + CE(s·Y·X_allᵀ, r·n + i)]      (each CE a mean over n rows)

    The mean of L_r over ranks is clip_loss on the concatenated batch; on one process this is clip_loss.
    """
    if _world_size() == 1:
        return clip_loss(image_emb, text_emb, logit_scale)
    all_image_emb, all_text_emb = gather_with_grad(image_emb), gather_with_grad(text_emb)  # [W·n, D]
    scale = logit_scale.exp()
    logits_per_image = scale * image_emb @ all_text_emb.T  # [n, W·n]
    logits_per_text = scale * text_emb @ all_image_emb.T  # [n, W·n]
    n = image_emb.shape[0]
    targets = torch.arange(n, device=image_emb.device) + _rank() * n
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def _exchange(x: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
    """Send x to one rank while receiving a tensor of the same shape from another."""
    x = x.contiguous()
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to), dist.P2POp(dist.irecv, received, receive_from)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Pass a tensor one step round the ring (rank r -> r+1); gradients travel back the other way (r+1 -> r).

    The received tensor belongs to rank r-1, so the gradient this rank computes for it is sent back to
    r-1, and the gradient rank r+1 computed for our tensor arrives from r+1. Chained shifts chain their
    backwards, so a text block that travelled k steps returns its gradient k steps to its owner.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world_size = _rank(), _world_size()
        return _exchange(x, send_to=(rank + 1) % world_size, receive_from=(rank - 1) % world_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world_size = _rank(), _world_size()
        return _exchange(grad, send_to=(rank - 1) % world_size, receive_from=(rank + 1) % world_size)


def _sigmoid_block_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: bool,
) -> torch.Tensor:
    """Return -Σ_ij log σ(z_ij (s·x_i·y_j + b)) over one [n, n] block: z = 2I - 1 if positives, else -1."""
    logits = scale * image_emb @ text_emb.T + logit_bias  # [n, n]
    if positives:
        labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    else:
        labels = -torch.ones_like(logits)
    return -F.logsigmoid(labels * logits).sum()


def distributed_siglip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Return this rank's SigLIP loss, passing text blocks round a ring instead of building the N×N matrix.

    SigLIP's chunked implementation (paper §3.3). With t = exp(logit_scale), local X, Y [n, D] and Y_(r-k)
    the text block of rank r-k after k ring steps:

        L_r = -1/n [ Σ_ij log σ(z_ij (t·x_i·y_j + b))                      (own block, z = 2I - 1)
                     + Σ_{k=1}^{W-1} Σ_ij log σ(-(t·x_i·y_(r-k),j + b)) ]   (remote blocks: negatives only)

    The single-process loss on N = W·n pairs is -1/N Σ over all N² pairs = (1/W) Σ_r L_r: the mean of the
    rank losses, as for distributed_clip_loss. Memory is O(n²) per rank; W - 1 exchanges of [n, D].
    """
    world_size = _world_size()
    if world_size == 1:
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias)
    scale = logit_scale.exp()
    total = _sigmoid_block_loss(image_emb, text_emb, scale, logit_bias, positives=True)
    travelling_text_emb = text_emb
    for _ in range(world_size - 1):
        travelling_text_emb = _RingShift.apply(travelling_text_emb)
        total = total + _sigmoid_block_loss(
            image_emb, travelling_text_emb, scale, logit_bias, positives=False
        )
    return total / image_emb.shape[0]
