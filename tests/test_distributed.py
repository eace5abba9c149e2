"""The distributed losses on 2 and 3 gloo CPU processes equal a single-process run on the concatenated batch.

One spawn of 3 processes runs every check in a 3-rank world and then a 2-rank one, saving each rank's losses
and gradients to a file; the tests compare those with the single-process losses in float64. Convention under test (see mmlm.train.distributed):
the mean of the rank losses is the single-process loss, each rank's embedding gradient is world_size × the
single-process gradient of its rows, and averaged (DDP) parameter gradients equal the single-process ones.
"""

import dataclasses
import math
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_train import tiny_model_and_batches
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmlm.errors import InputError
from mmlm.processing.image import ImageProcessor, PixelNormalize
from mmlm.train.accumulation import accumulate_contrastive_gradients
from mmlm.train.distributed import (
    DistInfo,
    cleanup,
    distributed_clip_loss,
    distributed_siglip_loss,
    gather_with_grad,
    init_distributed,
    is_main,
)
from mmlm.train.loop import train
from mmlm.train.losses import clip_loss, siglip_loss
from mmlm.train.stop_signals import RunStopped, StopSignals

LOCAL_BATCH, EMBED_DIM, IMAGE_DIM, TEXT_DIM = 4, 8, 6, 5
ATOL = 1e-6
WORLD_SIZES = (3, 2)  # 2 is the brief's case; 3 makes texts travel more than one ring step
LOSSES = {"clip": (clip_loss, distributed_clip_loss), "siglip": (siglip_loss, distributed_siglip_loss)}


def _batch(world_size: int) -> dict[str, torch.Tensor]:
    """A fixed float64 batch of N = world_size·n pairs: embeddings, tower inputs, logit scale and bias."""
    g = torch.Generator().manual_seed(1234)
    n = world_size * LOCAL_BATCH
    return {
        "image_emb": F.normalize(torch.randn(n, EMBED_DIM, generator=g, dtype=torch.float64), dim=-1),
        "text_emb": F.normalize(torch.randn(n, EMBED_DIM, generator=g, dtype=torch.float64), dim=-1),
        "pixels": torch.randn(n, IMAGE_DIM, generator=g, dtype=torch.float64),
        "tokens": torch.randn(n, TEXT_DIM, generator=g, dtype=torch.float64),
        "logit_scale": torch.tensor(math.log(10.0), dtype=torch.float64),  # SigLIP's init t' = log 10
        "logit_bias": torch.tensor(-10.0, dtype=torch.float64),
    }


class DualTower(nn.Module):
    """Two linear towers with a learned logit scale (and bias for SigLIP): the smallest CLIP to wrap in DDP."""

    def __init__(self, with_bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image_tower = nn.Linear(IMAGE_DIM, EMBED_DIM, dtype=torch.float64)
        self.text_tower = nn.Linear(TEXT_DIM, EMBED_DIM, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        # an unused parameter would stall DDP's gradient bucket, so CLIP's model has no bias at all
        self.logit_bias = nn.Parameter(torch.tensor(-10.0, dtype=torch.float64)) if with_bias else None

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image_tower(pixels), dim=-1), F.normalize(self.text_tower(tokens), dim=-1)


def _loss(loss_fn, name: str, image_emb, text_emb, logit_scale, logit_bias) -> torch.Tensor:
    if name == "clip":
        return loss_fn(image_emb, text_emb, logit_scale)
    return loss_fn(image_emb, text_emb, logit_scale, logit_bias)


def _embedding_run(name: str, loss_fn, batch: dict, rows: slice) -> dict[str, torch.Tensor]:
    """Loss and gradients w.r.t. the embeddings, logit scale and bias, for the given rows of the batch."""
    leaves = {key: batch[key][rows].clone().requires_grad_() for key in ("image_emb", "text_emb")}
    leaves |= {key: batch[key].clone().requires_grad_() for key in ("logit_scale", "logit_bias")}
    loss = _loss(loss_fn, name, *leaves.values())
    loss.backward()
    grads = {key: leaf.grad for key, leaf in leaves.items() if leaf.grad is not None}
    return {"loss": loss.detach(), **grads}


def _tower_run(name: str, loss_fn, batch: dict, rows: slice, ddp: bool) -> dict[str, torch.Tensor]:
    """Loss and parameter gradients of the DualTower on the given rows, wrapped in DDP if asked."""
    model = DualTower(with_bias=name == "siglip")
    wrapped = DistributedDataParallel(model) if ddp else model
    image_emb, text_emb = wrapped(batch["pixels"][rows], batch["tokens"][rows])
    loss = _loss(loss_fn, name, image_emb, text_emb, model.logit_scale, model.logit_bias)
    loss.backward()
    return {"loss": loss.detach(), **{key: p.grad for key, p in model.named_parameters()}}


def _accumulated_tower_run(
    name: str, loss_fn, batch: dict, rows: slice, compiled: bool = False
) -> dict[str, torch.Tensor]:
    """Loss and parameter gradients of the DDP-wrapped DualTower on the given rows as 2 accumulated micro-batches;
    `compiled`: the DDP module and the loss compiled as the trainer's `compile: true` does (aot_eager here)."""
    model = DualTower(with_bias=name == "siglip")
    micro_batches = list(zip(batch["pixels"][rows].chunk(2), batch["tokens"][rows].chunk(2), strict=True))
    features_loss = lambda image, text, scale, bias: _loss(loss_fn, name, image, text, scale, bias)  # noqa: E731
    net = DistributedDataParallel(model)
    if compiled:
        net, features_loss = (torch.compile(f, backend="aot_eager") for f in (net, features_loss))
    loss = accumulate_contrastive_gradients(net, model, micro_batches, features_loss)
    return {"loss": loss, **{key: p.grad for key, p in model.named_parameters()}}


class _SignalledBatches:
    """Fixed batches, counting those drawn; rank 1 gets SIGTERM while it draws the second (step 2's)."""

    def __init__(self, batches: list, rank: int) -> None:
        self.batches, self.rank, self.drawn = batches, rank, 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            if self.drawn == 2 and self.rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # StopSignals records it; the step in flight finishes
            yield batch

    def state_dict(self) -> dict:
        return {}


def _stopped_run(info: DistInfo, run_dir: Path) -> dict:
    """A tiny DualEncoder under DDP, log_every=4, rank 1 signalled at step 2: the message of each rank's
    RunStopped and the steps at which it asked the other ranks about a stop."""
    cfg, model, batches = tiny_model_and_batches(8)
    run_dir.mkdir(exist_ok=True)
    data, asked, requested = _SignalledBatches(batches, info.rank), [], StopSignals.requested

    def counted(stop: StopSignals, dist: DistInfo) -> bool:
        asked.append(data.drawn)  # one batch per step: the step just taken
        return requested(stop, dist)

    StopSignals.requested = counted
    try:
        train(dataclasses.replace(cfg, log_every=4), model, data, run_dir, dist=info,
              normalize=PixelNormalize(ImageProcessor.clip(16)))  # fmt: skip
    except RunStopped as stopped:
        return {"message": str(stopped), "asked": asked}
    finally:
        StopSignals.requested = requested
    return {"message": "finished without a stop", "asked": asked}


def _rank_main(rank: int, ports: dict[int, int], out_dir: str) -> None:
    """One process: for each world size it belongs to, join through torchrun's variables, run, save, leave."""
    torch.set_num_threads(1)
    # one spawn serves every world size: starting a process that imports torch is the slow part
    for world_size, port in ports.items():
        if rank >= world_size:
            continue
        os.environ |= {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        info = init_distributed()
        batch = _batch(world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {"info": info, "is_main": is_main(), "gathered": gather_with_grad(batch["image_emb"][rows])}
        for name, (_, distributed_loss) in LOSSES.items():
            results[name] = _embedding_run(name, distributed_loss, batch, rows)
            results[f"{name}_ddp"] = _tower_run(name, distributed_loss, batch, rows, ddp=True)
            results[f"{name}_ddp_accumulated"] = _accumulated_tower_run(name, distributed_loss, batch, rows)
            results[f"{name}_ddp_compiled"] = _accumulated_tower_run(
                name, distributed_loss, batch, rows, compiled=True
            )
        results["stopped"] = _stopped_run(info, Path(out_dir) / f"stopped_world{world_size}")
        torch.save(results, Path(out_dir) / f"world{world_size}_rank{rank}.pt")
        cleanup()
        torch._dynamo.reset()  # compiled code guards on the process group just destroyed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results_by_world_size(tmp_path_factory) -> dict[int, list[dict]]:
    """Run _rank_main on 3 gloo processes (a 3-rank world, then a 2-rank one) and load every rank's results."""
    out_dir = tmp_path_factory.mktemp("ranks")
    ports = {world_size: _free_port() for world_size in WORLD_SIZES}
    nprocs = max(WORLD_SIZES)
    context = mp.start_processes(
        _rank_main, args=(ports, str(out_dir)), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 120 s (a deadlocked exchange?)")
    return {
        w: [torch.load(out_dir / f"world{w}_rank{r}.pt", weights_only=False) for r in range(w)]
        for w in WORLD_SIZES
    }


@pytest.fixture(params=WORLD_SIZES, ids=lambda w: f"world{w}")
def ranks(request, results_by_world_size) -> list[dict]:
    """Each rank's results for one world size, in rank order."""
    return results_by_world_size[request.param]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
def test_init_distributed_reads_torchrun_variables(ranks):
    world_size = len(ranks)
    for rank, result in enumerate(ranks):
        assert result["info"] == DistInfo(rank, rank, world_size, torch.device("cpu"))
        assert result["is_main"] == (rank == 0)


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
def test_gather_with_grad_concatenates_in_rank_order(ranks):
    expected = _batch(len(ranks))["image_emb"]
    for result in ranks:
        assert torch.equal(result["gathered"], expected)


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", LOSSES)
def test_mean_of_rank_losses_is_the_single_process_loss(ranks, name):
    single = _embedding_run(name, LOSSES[name][0], _batch(len(ranks)), slice(None))
    _assert_close(torch.stack([r[name]["loss"] for r in ranks]).mean(), single["loss"])


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", LOSSES)
def test_embedding_gradients_are_world_size_times_single_process(ranks, name):
    # every rank's loss reaches every embedding (gather or ring), so a rank's rows get W × ∂L/∂x
    world_size = len(ranks)
    single = _embedding_run(name, LOSSES[name][0], _batch(world_size), slice(None))
    for key in ("image_emb", "text_emb"):
        _assert_close(torch.cat([r[name][key] for r in ranks]) / world_size, single[key])


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", LOSSES)
def test_averaged_scale_and_bias_gradients_are_single_process(ranks, name):
    single = _embedding_run(name, LOSSES[name][0], _batch(len(ranks)), slice(None))
    keys = ["logit_scale", "logit_bias"] if name == "siglip" else ["logit_scale"]
    for key in keys:  # the all-reduce mean that DDP would apply
        _assert_close(torch.stack([r[name][key] for r in ranks]).mean(), single[key])


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", LOSSES)
def test_ddp_parameter_gradients_are_single_process(ranks, name):
    single = _tower_run(name, LOSSES[name][0], _batch(len(ranks)), slice(None), ddp=False)
    _assert_close(torch.stack([r[f"{name}_ddp"]["loss"] for r in ranks]).mean(), single["loss"])
    parameter_names = [
        key for key in single if key != "loss"
    ]  # both towers, logit_scale, logit_bias (SigLIP)
    for result in ranks:  # DDP has already averaged over ranks, so every rank holds the full gradient
        for key in parameter_names:
            _assert_close(result[f"{name}_ddp"][key], single[key])


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", LOSSES)
def test_ddp_accumulation_with_gathered_negatives_equals_one_single_process_batch(ranks, name):
    # each rank accumulates 2 micro-batches of 2; the loss sees all W·4 pairs, as one process on the whole batch
    single = _tower_run(name, LOSSES[name][0], _batch(len(ranks)), slice(None), ddp=False)
    _assert_close(torch.stack([r[f"{name}_ddp_accumulated"]["loss"] for r in ranks]).mean(), single["loss"])
    for result in ranks:  # DDP averaged the parameter gradients on the last micro-batch's backward only
        for key in (key for key in single if key != "loss"):
            _assert_close(result[f"{name}_ddp_accumulated"][key], single[key])


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", LOSSES)
def test_compiled_ddp_accumulation_equals_one_single_process_batch(ranks, name):
    # no_sync on the compiled DDP module still holds the all-reduce back to the last micro-batch
    single = _tower_run(name, LOSSES[name][0], _batch(len(ranks)), slice(None), ddp=False)
    _assert_close(torch.stack([r[f"{name}_ddp_compiled"]["loss"] for r in ranks]).mean(), single["loss"])
    for result in ranks:
        for key in (key for key in single if key != "loss"):
            _assert_close(result[f"{name}_ddp_compiled"][key], single[key])


@pytest.mark.slow  # shares one spawn of 3 processes, ~20 s on 2 cores
def test_ranks_ask_about_a_stop_only_at_log_steps_and_stop_together(ranks):
    # rank 1 was signalled during step 2: without asking at every step (a host sync each), all ranks stop at 4
    for result in ranks:
        assert result["stopped"]["asked"] == [4]
        assert result["stopped"]["message"].startswith("SIGTERM: stopped after step 4; checkpoint ")


def test_single_process_fallback(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    info = init_distributed()
    assert (info.rank, info.local_rank, info.world_size) == (0, 0, 1)
    assert is_main()
    batch = _batch(1)
    x, y, t, b = batch["image_emb"], batch["text_emb"], batch["logit_scale"], batch["logit_bias"]
    assert gather_with_grad(x) is x
    assert torch.equal(distributed_clip_loss(x, y, t), clip_loss(x, y, t))
    assert torch.equal(distributed_siglip_loss(x, y, t, b), siglip_loss(x, y, t, b))
    cleanup()  # nothing joined, nothing to leave


def test_partial_torchrun_environment_names_the_missing_variables(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for variable in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(InputError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        init_distributed()
