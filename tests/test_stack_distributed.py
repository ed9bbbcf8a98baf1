"""resfast under torch.distributed: DDP (also with gradient_as_bucket_view), ZeroRedundancyOptimizer
and FSDP2 (DTensor params, updated on their local shards), each trained by 2 gloo processes on the
CPU and compared with one process training on the whole batch.

All scenarios run in one spawn of 2 processes (starting them costs more than training), which write
their final parameters to files; the tests below compare those files."""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import resfast.optim
from resfast.nn import BatchNormAddReLU, SyncBatchNormAddReLU, convert_sync_batchnorm, fuse_resnet
from resfast.nn.cifar import resnet20

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
# Three steps: enough for every optimizer state to be used, few enough that no ReLU of the fused
# ResNets flips between runs. Their training is chaotic past that: at the fourth step a conv1 grad
# moves by 4.6e-3 between two fp32 roundings of the same update (torch.optim.SGD's or resfast's
# vectorised one against resfast's reference, which differ by an ulp), which no bound derived from
# the single process's fp32 error can cover.
STEPS = 3
BATCH = 8  # per process; the single-process reference trains on WORLD * BATCH
LR = 0.01


def _small_model() -> nn.Module:
    """A conv layer and a linear head whose 1-element bias leaves rank 1 an empty FSDP2 shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))


def _synced_resnet() -> nn.Module:
    """A fused ResNet-20 whose BatchNorms synchronise over the processes; in a single process (no
    process group) it is the plain fused model, the reference."""
    torch.manual_seed(0)
    return convert_sync_batchnorm(fuse_resnet(resnet20(num_classes=1)))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(WORLD * BATCH, 3, 8, 8, generator=gen), torch.randn(WORLD * BATCH, 1, generator=gen))
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    """STEPS steps of mean squared error; each process takes its slice of every batch (in the
    model's dtype)."""
    dtype = next(model.parameters()).dtype
    for x, y in _batches():
        opt.zero_grad()
        F.mse_loss(model(x.chunk(world)[rank].to(dtype)), y.chunk(world)[rank].to(dtype)).backward()
        opt.step()


def _final_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (gathered from their shards when they are DTensors) and buffers."""
    tensors = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
    return {name: t.detach().clone() for name, t in (tensors | dict(model.named_buffers())).items()}


OPTIONS = {"Adam": {}, "SGD": {"momentum": 0.9}}


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    return getattr(resfast.optim, name)(params, lr=LR, **OPTIONS[name])


# -- the scenarios, run in each process ------------------------------------------------------------


def _ddp(rank: int, model: nn.Module, optimizer: str, **ddp_kwargs) -> dict[str, torch.Tensor]:
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    _train(ddp, _optimizer(optimizer, ddp.parameters()), rank, WORLD)
    return _final_tensors(model)


def _zero(rank: int, model: nn.Module, optimizer: str) -> dict[str, torch.Tensor]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ddp = nn.parallel.DistributedDataParallel(model)
    opt_class = getattr(resfast.optim, optimizer)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=opt_class, lr=LR, **OPTIONS[optimizer])
    _train(ddp, opt, rank, WORLD)
    return _final_tensors(model)


def _fsdp2(rank: int, model: nn.Module, optimizer: str) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _optimizer(optimizer, model.parameters())
    _train(model, opt, rank, WORLD)
    # The states are DTensors sharded like their params, as torch.optim keeps them.
    states = [s for state in opt.state.values() for s in state.values() if s.dim() > 0]
    assert states and all(isinstance(s, DTensor) for s in states)
    return _final_tensors(model)


# name -> (model, resfast optimizer, how each process trains them)
SCENARIOS: dict[str, tuple[Callable[[], nn.Module], str, Callable[..., dict[str, torch.Tensor]]]] = {
    "ddp": (_small_model, "Adam", _ddp),
    "ddp gradient_as_bucket_view": (
        _small_model,
        "Adam",
        functools.partial(_ddp, gradient_as_bucket_view=True),
    ),
    "zero (ZeroRedundancyOptimizer)": (_small_model, "Adam", _zero),
    "fsdp2 Adam": (_small_model, "Adam", _fsdp2),
    "fsdp2 SGD momentum": (_small_model, "SGD", _fsdp2),
    # With synchronised statistics the processes' half batches normalise as the whole batch does, so
    # the running stats too must equal the single process's. SGD, because Adam's first updates are
    # +-lr for every gradient element however small: where a ResNet's gradient is ~0, rounding picks
    # the direction, and two correct runs then differ by ~lr.
    "ddp fused resnet with SyncBatchNormAddReLU": (_synced_resnet, "SGD", _ddp),
    "fsdp2 fused resnet with SyncBatchNormAddReLU": (_synced_resnet, "SGD", _fsdp2),
}


def _bn_with_an_empty_rank(rank: int, module: type[BatchNormAddReLU]) -> dict[str, torch.Tensor]:
    """A training forward/backward where rank 1 brings no samples (as DDP's uneven last batches can):
    it must still take part in the collectives, and rank 0 must get the results of its batch alone."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)[: 4 if rank == 0 else 0].requires_grad_()
    bn = module(3)
    y = bn(x)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dweight": bn.weight.grad, "running_var": bn.running_var}


def _worker(rank: int, out_dir: str) -> None:
    # A bounded timeout: a collective one rank skips fails the test instead of hanging it.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {name: run(rank, make(), optimizer) for name, (make, optimizer, run) in SCENARIOS.items()}
        results["empty rank"] = _bn_with_an_empty_rank(rank, SyncBatchNormAddReLU)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[torch.Tensor]]]:
    """Each rank's final parameters per scenario."""
    out_dir = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(_worker, args=(str(out_dir),), nprocs=WORLD)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(scenario: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    make, optimizer, _ = SCENARIOS[scenario]
    model = make().to(dtype)
    _train(model, _optimizer(optimizer, model.parameters()), 0, 1)
    return _final_tensors(model)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trains_like_one_process_on_the_whole_batch(distributed_results, scenario: str) -> None:
    """Every rank ends with the parameters (and buffers) of a single process that trained on both
    ranks' data.

    Tolerance: against that process in float64, at most twice its own fp32 error (the distributed run
    computes the same means in another order: each rank's, then the all-reduce's; with SyncBatchNorm,
    statistics combined from two halves), plus a few fp32 roundings of the value for when that error
    happens to be ~0. The fp32 error itself is not small everywhere: normalising a ResNet's 2x2 last
    stage over 64 values per channel amplifies fp32 rounding to ~1e-4 of the update in 4 steps."""
    truth, fp32 = _single_process(scenario, torch.float64), _single_process(scenario, torch.float32)
    for rank, results in enumerate(distributed_results):
        got = results[scenario]
        assert got.keys() == truth.keys()
        for name, want in truth.items():
            if not want.is_floating_point():
                assert torch.equal(got[name], want), f"rank {rank}, {name}"
                continue
            scale = max(want.abs().max().item(), 1.0)
            bound = (
                2 * (fp32[name].double() - want).abs().max().item()
                + 8 * torch.finfo(torch.float32).eps * scale
            )
            err = (got[name].double() - want).abs().max().item()
            assert err <= bound, f"rank {rank}, {name}: error {err:.3g} > {bound:.3g}"
    initial = _final_tensors(SCENARIOS[scenario][0]())
    assert not any(torch.equal(initial[n], t) for n, t in fp32.items() if t.is_floating_point()), (
        "never updated"
    )


def test_sync_batchnorm_with_an_empty_rank(distributed_results) -> None:
    """Rank 0's output and gradients are those of its 4 samples alone (the empty rank adds nothing to
    the statistics or the sums); both ranks' running stats hold those statistics. Same kernels on the
    same values, so equal to fp32 rounding of the combination."""
    want = _bn_with_an_empty_rank(0, BatchNormAddReLU)
    for name, value in want.items():
        torch.testing.assert_close(distributed_results[0]["empty rank"][name], value, msg=name)
    torch.testing.assert_close(distributed_results[1]["empty rank"]["running_var"], want["running_var"])
    assert distributed_results[1]["empty rank"]["y"].numel() == 0
