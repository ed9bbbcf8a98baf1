"""resfast under torch.distributed: DDP (also with gradient_as_bucket_view), ZeroRedundancyOptimizer
and FSDP2 (DTensor params, updated on their local shards), each trained by 2 gloo processes on the
CPU and compared with one process training on the whole batch.

All scenarios run in one spawn of 2 processes (starting them costs more than training), which write
their final parameters to files; the tests below compare those files."""

from __future__ import annotations

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

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 4
BATCH = 8  # per process; the single-process reference trains on WORLD * BATCH
LR = 0.01


def _model() -> nn.Module:
    """A conv layer and a linear head whose 1-element bias leaves rank 1 an empty FSDP2 shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(WORLD * BATCH, 3, 8, 8, generator=gen), torch.randn(WORLD * BATCH, 1, generator=gen))
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    """STEPS steps of mean squared error; each process takes its slice of every batch."""
    for x, y in _batches():
        opt.zero_grad()
        F.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        opt.step()


def _plain_params(model: nn.Module) -> list[torch.Tensor]:
    """The whole parameters, gathered from their shards when they are DTensors."""
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()
    ]


# -- the scenarios, run in each process ------------------------------------------------------------


def _ddp(rank: int, optimizer: str, **ddp_kwargs) -> list[torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(_model(), **ddp_kwargs)
    _train(model, _optimizer(optimizer, model.parameters()), rank, WORLD)
    return _plain_params(model.module)


def _zero(rank: int, optimizer: str) -> list[torch.Tensor]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = nn.parallel.DistributedDataParallel(_model())
    opt_class = getattr(resfast.optim, optimizer)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=opt_class, lr=LR, **OPTIONS[optimizer])
    _train(model, opt, rank, WORLD)
    return _plain_params(model.module)


def _fsdp2(rank: int, optimizer: str) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _optimizer(optimizer, model.parameters())
    _train(model, opt, rank, WORLD)
    # The states are DTensors sharded like their params, as torch.optim keeps them.
    states = [s for state in opt.state.values() for s in state.values() if s.dim() > 0]
    assert states and all(isinstance(s, DTensor) for s in states)
    return _plain_params(model)


OPTIONS = {"Adam": {}, "SGD": {"momentum": 0.9}}


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    return getattr(resfast.optim, name)(params, lr=LR, **OPTIONS[name])


# name -> (resfast optimizer, how one process trains with it)
SCENARIOS: dict[str, tuple[str, Callable[..., list[torch.Tensor]]]] = {
    "ddp": ("Adam", _ddp),
    "ddp gradient_as_bucket_view": ("Adam", functools.partial(_ddp, gradient_as_bucket_view=True)),
    "zero (ZeroRedundancyOptimizer)": ("Adam", _zero),
    "fsdp2 Adam": ("Adam", _fsdp2),
    "fsdp2 SGD momentum": ("SGD", _fsdp2),
}


def _worker(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {name: run(rank, optimizer) for name, (optimizer, run) in SCENARIOS.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[torch.Tensor]]]:
    """Each rank's final parameters per scenario."""
    out_dir = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(_worker, args=(str(out_dir),), nprocs=WORLD)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(optimizer: str) -> list[torch.Tensor]:
    model = _model()
    _train(model, _optimizer(optimizer, model.parameters()), 0, 1)
    return _plain_params(model)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trains_like_one_process_on_the_whole_batch(distributed_results, scenario: str) -> None:
    """Every rank ends with the parameters of a single process that trained on both ranks' data.

    Tolerance: the gradient is the same mean computed in another order (each rank's mean, then the
    all-reduce's average), a few fp32 roundings apart, which 4 steps of lr 0.01 keep far below 1e-5
    relative to the parameters."""
    want = _single_process(SCENARIOS[scenario][0])
    for rank, results in enumerate(distributed_results):
        for i, (got, ref) in enumerate(zip(results[scenario], want, strict=True)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"rank {rank}, param {i}")
    moved = [
        not torch.equal(a, b)
        for a, b in zip(distributed_results[0][scenario], _model().parameters(), strict=True)
    ]
    assert all(moved), "some parameters were never updated"
