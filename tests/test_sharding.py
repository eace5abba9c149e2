"""parallel=fsdp (mmlm.train.sharding): FSDP2 on 2 gloo CPU processes equals one process on the whole batch.

One spawn of 2 processes runs a tiny float64 CLIP and VLM (with and without LoRA), each sharded with the
trainers' own sharded_copy, on its half of a fixed batch and saves its loss and its full (gathered) gradients;
the tests compare them with one unsharded process on the concatenated batch. Every rank holds the same number
of answer tokens, so the mean of the rank losses is the whole batch's token-mean loss, as for the contrastive
losses (mmlm.train.distributed), and FSDP2's averaged gradients are the single-process ones.

The same two processes then run both trainers end to end with parallel=fsdp (runs inside a process cost a
fraction of a torchrun launch): a CLIP run beside the same run under DDP, and each trainer straight, stopped by
SIGTERM and resumed from its sharded checkpoint.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_distributed import _free_port
from test_train import TINY

import mmlm
from mmlm.cli import main
from mmlm.errors import InputError
from mmlm.layers.lora import apply_lora
from mmlm.models.decoder_lm import LMConfig
from mmlm.models.dual_encoder import DualEncoder, DualEncoderConfig
from mmlm.models.text import TextConfig
from mmlm.models.vision import VisionConfig
from mmlm.models.vlm import VisionLanguageModel, VLMConfig
from mmlm.train.config import TrainConfig, load_train_config
from mmlm.train.distributed import cleanup, distributed_clip_loss, init_distributed
from mmlm.train.run import run_clip_training
from mmlm.train.sharding import full_tensor, sharded_copy, transformer_blocks
from mmlm.train.stop_signals import RunStopped
from mmlm.train.vlm_build import build_vlm
from mmlm.train.vlm_config import StageConfig, VLMTrainConfig, vlm_config_from_dict
from mmlm.train.vlm_loop import RowLosses, batch_loss, run_vlm_training, set_trainable

WORLD, LOCAL, ATOL = 2, 4, 1e-6
VOCAB, IMAGE_TOKEN, ANSWER = 40, 39, 3  # ANSWER: answer tokens per row, the same on every rank
VLM_MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
}
VLM_CASES = {"vlm": ["connector", "lm"], "vlm_lora": ["connector", "lora"]}  # the ViT frozen in both


def _clip_model() -> DualEncoder:
    torch.manual_seed(0)
    vision = VisionConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_dim=32, embed_dim=8)
    text = TextConfig(
        vocab_size=VOCAB, width=16, layers=2, heads=2, mlp_dim=32, embed_dim=8, context_length=8
    )
    return DualEncoder(DualEncoderConfig(vision=vision, text=text)).double()


def _vlm_model(train: list[str]) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = VisionConfig(
        image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_dim=32, embed_dim=None
    )
    lm = LMConfig(vocab_size=VOCAB, width=16, layers=2, heads=2, kv_heads=1, mlp_dim=32, max_positions=32)
    model = VisionLanguageModel(VLMConfig(vision, lm, image_token_id=IMAGE_TOKEN)).double()
    if "lora" in train:
        apply_lora(model.lm, 2, 4.0, ["qkv", "out"])
        for name, p in model.lm.named_parameters():
            if name.endswith("lora_B"):  # B = 0 at init would leave A without a gradient to compare
                torch.nn.init.normal_(p, std=0.1)
    set_trainable(model, StageConfig(steps=1, train=train), 0)
    return model


def _batch() -> dict[str, torch.Tensor]:
    """A fixed batch of WORLD·LOCAL rows: CLIP pixels and ids; VLM rows of 4 image slots, a prompt of 2 to 4
    tokens and ANSWER answer tokens, right-padded, the lengths differing within each rank's rows."""
    g = torch.Generator().manual_seed(1234)
    n = WORLD * LOCAL
    lengths = [4 + 2 + r % 3 + ANSWER for r in range(n)]
    ids = torch.zeros(n, max(lengths), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, length in enumerate(lengths):
        ids[r, :length] = torch.randint(1, IMAGE_TOKEN, (length,), generator=g)
        ids[r, :4] = IMAGE_TOKEN
        labels[r, length - ANSWER : length] = ids[r, length - ANSWER : length]
        mask[r, :length] = 1
    return {
        "pixels": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
        "text_ids": torch.randint(1, VOCAB, (n, 8), generator=g),
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
    }


def _gradients(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained parameter's whole gradient, in the unsharded model's shapes (scalars are [1] sharded)."""
    return {name: full_tensor(p.grad).reshape(-1) for name, p in net.named_parameters() if p.grad is not None}


def _clip_run(batch: dict, rows: slice, sharded: bool) -> dict:
    model = _clip_model()
    net = sharded_copy(model, torch.device("cpu"), bf16=False) if sharded else model
    image, text = net(batch["pixels"][rows], batch["text_ids"][rows])
    loss = distributed_clip_loss(image, text, net.logit_scale)  # one process: clip_loss
    loss.backward()
    # on DTensor gradients; the norm is ~130, so the compared gradients are the clipped ones
    norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), max_norm=1.0)
    return {"loss": loss.detach(), "norm": full_tensor(norm), "grads": _gradients(net)}


def _bf16_clip_run(batch: dict, rows: slice) -> dict:
    """The fp32 CLIP sharded with bf16 mixed precision: bf16 compute, fp32 gradients on the fp32 shards."""
    model = _clip_model().float()
    net = sharded_copy(model, torch.device("cpu"), bf16=True)
    image, text = net(batch["pixels"][rows].float(), batch["text_ids"][rows])
    loss = distributed_clip_loss(image, text, net.logit_scale)
    loss.backward()
    grads = {p.grad.dtype for p in net.parameters()} | {p.dtype for p in net.parameters()}
    return {"loss": loss.detach().double(), "embedding_dtype": image.dtype, "shard_dtypes": grads}


def _vlm_run(batch: dict, rows: slice, train: list[str], sharded: bool) -> dict:
    model = _vlm_model(train)
    net = (
        sharded_copy(RowLosses(model, group_by_length=False), torch.device("cpu"), False)
        if sharded
        else RowLosses(model)
    )
    row_loss, row_tokens = net(batch["input_ids"][rows], batch["labels"][rows], batch["attention_mask"][rows],
                               batch["pixels"][rows])  # fmt: skip
    loss = batch_loss(row_loss, row_tokens)
    loss.backward()
    return {"loss": loss.detach(), "grads": _gradients(net)}


def _stop_at(stop_step: int | None):
    """An evaluation hook (rank 0 runs it, on the gathered weights) that SIGTERMs its process at `stop_step`."""

    def evaluate(*args) -> dict[str, float]:
        if args[-1] == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    return evaluate


def _stopped_and_resumed(
    train, config, out: Path, stop_step: int, rank: int, ports: list[int]
) -> list[list[dict]]:
    """Run straight, then stopped by SIGTERM after `stop_step`, then resumed from latest; return both records.

    A finished run leaves its process group, so the next joins a new one (on a new port); a stopped run stays.
    """
    _join(rank, ports[0])
    straight = train(config(out / "straight"), evaluate=_stop_at(None))[1]
    _join(rank, ports[1])
    try:
        train(config(out / "stopped"), evaluate=_stop_at(stop_step))
        raise AssertionError("the run did not stop")
    except RunStopped:
        pass  # every rank stopped after the same step, with one sharded checkpoint; the process group stays
    resumed = train(config(out / "stopped"), resume="latest", evaluate=_stop_at(None))[1]
    return [straight, resumed]


def _join(rank: int, port: int) -> None:
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    init_distributed()


def _clip_config(run_dir: Path, *extra: str) -> TrainConfig:
    return load_train_config(None, [*TINY, "steps=6", "eval_every=1", f"out_dir={run_dir}", *extra])


def _vlm_config(run_dir: Path) -> VLMTrainConfig:
    stages = {"align": {"steps": 2, "train": ["connector"], "data": {"samples": 32}},
              "instruct": {"steps": 3, "train": ["connector", "lora"], "data": {"samples": 32},
                           "vision_layers": 1, "vision_from_step": 1}}  # fmt: skip
    return vlm_config_from_dict({"model": VLM_MODEL, "stages": stages, "batch_size": 4, "max_length": 64,
                                 "log_every": 1, "eval_samples": 0, "eval_every": 1, "device": "cpu",
                                 "lora": {"rank": 2, "dropout": 0.1}, "data": {"workers": 0},
                                 "parallel": "fsdp", "out_dir": str(run_dir)})  # fmt: skip


def _rank_main(rank: int, ports: list[int], out_dir: str) -> None:
    """One process: the sharded forward and backward of each model, then whole runs of both trainers."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    _join(rank, ports[0])
    batch, rows = _batch(), slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = {"clip": _clip_run(batch, rows, sharded=True), "bf16": _bf16_clip_run(batch, rows)}
    for case, train in VLM_CASES.items():
        results[case] = _vlm_run(batch, rows, train, sharded=True)
    torch.save(results, out / f"rank{rank}.pt")
    cleanup()
    _join(rank, ports[1])
    records = {"ddp": run_clip_training(_clip_config(out / "clip" / "ddp"))[1]}
    fsdp_clip = lambda run_dir: _clip_config(run_dir, "parallel=fsdp")  # noqa: E731
    records["clip"] = _stopped_and_resumed(run_clip_training, fsdp_clip, out / "clip", 3, rank, ports[2:4])
    # stopped in the LoRA stage, before its ViT unfreezes: the checkpoint has no AdamW state for the ViT
    records["vlm"] = _stopped_and_resumed(run_vlm_training, _vlm_config, out / "vlm", 3, rank, ports[4:6])
    if rank == 0:
        torch.save(records, out / "records.pt")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """Run _rank_main on 2 gloo processes; return the folder of their results and runs."""
    out_dir = tmp_path_factory.mktemp("ranks")
    ports = [_free_port() for _ in range(6)]
    context = mp.start_processes(
        _rank_main, args=(ports, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 240 s (a rank waiting on an all-gather?)")
    return out_dir


@pytest.fixture(scope="module")
def ranks(out_dir) -> list[dict]:
    """Each rank's loss and gathered gradients."""
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def records(out_dir) -> dict[str, list]:
    """Rank 0's logged records of the end-to-end runs."""
    return torch.load(out_dir / "records.pt", weights_only=False)


def _assert_equal_to(single: dict, ranks: list[dict], case: str) -> None:
    torch.testing.assert_close(
        torch.stack([r[case]["loss"] for r in ranks]).mean(), single["loss"], atol=ATOL, rtol=0
    )
    for result in ranks:  # FSDP2 averaged the gradients: every rank's gathered gradient is the whole batch's
        assert result[case]["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result[case]["grads"][name], grad, atol=ATOL, rtol=0, msg=name)


@pytest.mark.slow  # all share one spawn of 2 processes, ~40 s on 2 cores
def test_sharded_clip_loss_gradients_and_clip_norm_equal_one_process(ranks):
    single = _clip_run(_batch(), slice(None), sharded=False)
    _assert_equal_to(single, ranks, "clip")
    assert "logit_scale" in single["grads"] and any(
        k.startswith("visual.transformer") for k in single["grads"]
    )
    for result in ranks:
        torch.testing.assert_close(result["clip"]["norm"], single["norm"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_shards(ranks):
    single = _clip_run(_batch(), slice(None), sharded=False)
    for result in ranks:
        assert result["bf16"]["embedding_dtype"] == torch.bfloat16
        assert result["bf16"]["shard_dtypes"] == {torch.float32}  # weights and reduced gradients
    mean = torch.stack([r["bf16"]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean, single["loss"], atol=0.05, rtol=0)  # bf16's 8-bit mantissa


@pytest.mark.slow
@pytest.mark.parametrize("case", VLM_CASES)
def test_sharded_vlm_loss_and_gradients_equal_one_process(ranks, case):
    single = _vlm_run(_batch(), slice(None), VLM_CASES[case], sharded=False)
    _assert_equal_to(single, ranks, case)
    trained = {name.split(".")[1] for name in single["grads"]}
    assert trained == {"connector", "lm"}  # the frozen ViT (and LoRA's frozen base weights) got none
    if case == "vlm_lora":
        assert all("lora_" in k for k in single["grads"] if k.startswith("model.lm."))


def test_transformer_blocks_are_found_in_every_tower_and_kept_out_of_skipped_parts():
    model = _vlm_model(["connector"])
    blocks = transformer_blocks(RowLosses(model))
    assert blocks == [*model.vision.transformer.blocks, *model.lm.blocks]
    assert transformer_blocks(RowLosses(model), ("model.vision",)) == list(model.lm.blocks)
    clip = _clip_model()
    assert transformer_blocks(clip) == [*clip.visual.transformer.blocks, *clip.text.transformer.blocks]


# ---- end to end: both trainers with parallel=fsdp, in the same two processes ----


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}  # a resumed run repeats the steps after its checkpoint


@pytest.mark.slow
def test_fsdp_clip_run_equals_ddp_and_exports_a_loadable_model(records, out_dir):
    straight, ddp = _losses(records["clip"][0]), _losses(records["ddp"])
    assert len(straight) == 6 and list(straight.values()) == pytest.approx(list(ddp.values()), abs=1e-5)
    sharded, unsharded = (mmlm.load(out_dir / "clip" / run / "model") for run in ("straight", "ddp"))
    weights = unsharded.model.state_dict()
    for name, tensor in sharded.model.state_dict().items():  # the same training, fp32 sums in another order
        torch.testing.assert_close(tensor, weights[name], atol=1e-5, rtol=0, msg=name)
    assert not torch.equal(
        weights["logit_scale"], DualEncoder(sharded.config).logit_scale.detach()
    )  # trained


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["clip", "vlm"])
def test_fsdp_run_stopped_by_sigterm_resumes_exactly_from_its_sharded_checkpoint(records, out_dir, trainer):
    straight, resumed = records[trainer]
    assert _losses(resumed) == _losses(straight)  # bit-identical: shards, optimiser, schedule, data, RNG
    run = out_dir / trainer / "stopped"
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3
    listed = json.loads((run / "checkpoints" / latest["path"] / "manifest.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "training_state.pt"} <= listed.keys()
    a, b = (
        load_file(str(out_dir / trainer / r / "model" / "model.safetensors")) for r in ("straight", "stopped")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if trainer == "vlm":
        assert not any("lora" in k for k in a)  # merged at the stage's end, into the gathered weights
        assert mmlm.load(out_dir / "vlm" / "stopped" / "model").model.cfg.lm.layers == 2


def test_fsdp_without_torchrun_or_an_unknown_parallel_is_one_line(tmp_path, capsys):
    assert main(["train", "clip", *TINY, f"out_dir={tmp_path}", "parallel=fsdp"]) == 2
    err = capsys.readouterr().err
    assert (
        "parallel: 'fsdp' shards across processes started by torchrun" in err and len(err.splitlines()) == 1
    )
    assert main(["train", "clip", "parallel=zero"]) == 2
    assert "parallel: expected one of ['ddp', 'fsdp'], got 'zero'" in capsys.readouterr().err
    with pytest.raises(InputError, match="parallel: expected one of"):
        vlm_config_from_dict({"parallel": "zero"})


@pytest.mark.slow
def test_fsdp_vlm_trains_the_vit_blocks_unfrozen_mid_stage(records, out_dir):
    run = out_dir / "vlm" / "straight"
    initial = build_vlm(_vlm_config(run), run / "tokenizer")[0].state_dict()
    trained = mmlm.load(run / "model").model.state_dict()
    changed = {k for k in initial if k.startswith("vision.") and not torch.equal(initial[k], trained[k])}
    # FSDP2 picked up requires_grad set after sharding; block 1 lies past the features LLaVA reads (layer -2)
    assert "vision.transformer.blocks.0.attn.qkv.weight" in changed
    assert not any(k.startswith("vision.transformer.blocks.1.") for k in changed)
