"""Fully sharded data parallel (`parallel: fsdp`) for both trainers, with PyTorch's FSDP2 (`fully_shard`).

DDP keeps the whole model, its gradients and AdamW's two moments on every GPU; FSDP2 keeps 1/W of each per rank
and all-gathers one transformer block's weights just before that block runs. Each block of the towers, the LM
and a Q-Former is its own shard group (its all-gather overlaps the previous block's compute); everything else
(embeddings, norms, the connector, the logit scale) is in the root group, gathered once per forward.

Every rank must run the same shard groups the same number of times in a step, or the all-gathers of one rank
wait for ranks that never send. So the blocks of a part that a batch may skip (the ViT on a text-only batch)
stay in the root group, which every forward gathers, and the trainer runs the LM once per micro-batch.

The trainer trains a sharded copy of the model, made at the start of training (the VLM: of each stage, after
LoRA is added) from rank 0's weights; the caller's model gets the trained weights back on rank 0
(`gather_full_weights`), before each evaluation and at the end, so evaluation, adapters and the export run on
the unsharded model as they do under DDP. The caller's model stays on the CPU, so no GPU ever holds a full copy.
"""

import copy

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mmlm.errors import InputError


def check_launch(parallel: str) -> None:
    """Raise InputError when `parallel` is fsdp but this process was not started by torchrun."""
    if parallel == "fsdp" and not torch_dist.is_initialized():
        raise InputError(
            "parallel: 'fsdp' shards across processes started by torchrun "
            "(torchrun --nproc_per_node=N -m mmlm train ...); one process trains with parallel=ddp"
        )


def transformer_blocks(model: nn.Module, skipped: tuple[str, ...] = ()) -> list[nn.Module]:
    """Return the blocks of every `blocks` list in `model`, in order, except those under the `skipped` names."""
    out = []
    for name, module in model.named_modules():
        inside_skipped = any(name == s or name.startswith(s + ".") for s in skipped)
        if name.rpartition(".")[2] == "blocks" and isinstance(module, nn.ModuleList) and not inside_skipped:
            out.extend(module)
    return out


def mixed_precision(bf16: bool) -> MixedPrecisionPolicy:
    """Return FSDP2's policy: bf16 weights in forward and backward with fp32 gradient reduction, or all fp32.

    The sharded master weights and AdamW's state stay fp32 either way, as under DDP with autocast.
    """
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def sharded_copy(
    model: nn.Module, device: torch.device, bf16: bool, skipped: tuple[str, ...] = ()
) -> nn.Module:
    """Return a copy of `model` on `device`, every transformer block and then the whole sharded with fully_shard,
    holding rank 0's weights; blocks under the `skipped` names stay in the root group (see the module docstring)."""
    copied = copy.deepcopy(model)  # on the CPU: fully_shard moves one group at a time to the device
    for module in copied.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:  # fully_shard splits dim 0; a [1] tensor broadcasts wherever the scalar did
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    mesh, policy = init_device_mesh(device.type, (torch_dist.get_world_size(),)), mixed_precision(bf16)
    for block in transformer_blocks(copied, skipped):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(copied, mesh=mesh, mp_policy=policy)
    # ranks that only hold a stale copy (after an earlier stage, only rank 0 got the weights back) get rank 0's
    weights = _shaped_as(copied.state_dict(), model.state_dict()) if torch_dist.get_rank() == 0 else {}
    set_model_state_dict(
        copied, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    return copied


def is_sharded(module: nn.Module) -> bool:
    """Return whether `module` was sharded with fully_shard (by sharded_copy)."""
    return isinstance(module, FSDPModule)


def gather_full_weights(sharded: nn.Module, model: nn.Module) -> None:
    """Load the sharded copy's weights, gathered to rank 0's CPU, into `model` on rank 0; every rank must call it.
    A `sharded` that is not sharded (DDP, one process) trains `model`'s own weights: nothing to do."""
    if not is_sharded(sharded):
        return
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(sharded, options=options)  # empty on the other ranks
    if torch_dist.get_rank() == 0:
        model.load_state_dict(_shaped_as(model.state_dict(), weights))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the whole of a sharded tensor (every rank must call it), or the tensor itself if it is not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shaped_as(like: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `weights` viewed in the shapes of `like` (the scalars the sharded copy holds as [1])."""
    return {k: v.reshape(like[k].shape) for k, v in weights.items()}
