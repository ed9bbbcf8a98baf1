"""BatchNormAddReLU behaves as nn.BatchNorm2d followed by + residual and ReLU: running stats over
several steps, every option, state_dict in both directions, factory kwargs, moves, pickling."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from itertools import product

import pytest
import torch
from torch import nn

from resfast.backends import BackendUnavailable
from resfast.nn import BatchNormAddReLU
from tests.bn_helpers import poisoned_memory  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("poisoned_memory")

BACKENDS = ("reference", "triton")
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _reference_for(module: BatchNormAddReLU) -> nn.BatchNorm2d:
    """An nn.BatchNorm2d in float64 with module's options and state (loaded through state_dict)."""
    bn = nn.BatchNorm2d(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
    ).double()
    bn.load_state_dict(module.state_dict())
    return bn


# Train, train, eval, train with different batch shapes: momentum=None's cumulative average and
# num_batches_tracked need several steps to tell apart from an exponential one.
STEPS = ((True, (4, 3, 3, 5)), (True, (2, 3, 4, 4)), (False, (3, 3, 2, 5)), (True, (5, 3, 1, 3)))


@pytest.mark.parametrize(
    "backend, momentum, track, affine, with_residual",
    list(product(BACKENDS, (0.1, None), (True, False), (True, False), (True, False))),
)
def test_matches_batchnorm2d_over_steps(backend, momentum, track, affine, with_residual) -> None:
    gen = torch.Generator().manual_seed(0)
    fused = BatchNormAddReLU(3, momentum=momentum, affine=affine, track_running_stats=track, backend=backend)
    if affine:
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5, generator=gen)
            fused.bias.normal_(generator=gen)
    bn = _reference_for(fused)
    for training, shape in STEPS:
        fused.train(training)
        bn.train(training)
        x = (torch.randn(shape, generator=gen) * 2 + 1).requires_grad_()
        r = torch.randn(shape, generator=gen) if with_residual else None
        x64 = x.detach().double().requires_grad_()
        y = fused(x, r)
        y64 = torch.relu(bn(x64) + (0 if r is None else r.double()))
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        dy = torch.randn(shape, generator=gen)
        y.backward(dy)
        y64.backward(dy.double())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        for name in BN_KEYS:
            ours, ref = getattr(fused, name), getattr(bn, name)
            assert (ours is None) == (ref is None), name
            if ours is not None:
                torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-6, msg=name)
            if ours is not None and ours.grad is not None:
                torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5, msg=name)
    if track:
        assert fused.num_batches_tracked.item() == 3


def test_state_dict_loads_both_ways() -> None:
    fused, bn = BatchNormAddReLU(4), nn.BatchNorm2d(4)
    assert list(fused.state_dict()) == list(bn.state_dict()) == BN_KEYS
    with torch.no_grad():
        bn.running_mean.add_(1.5)
        bn.num_batches_tracked.fill_(7)
    fused.load_state_dict(bn.state_dict())
    assert torch.equal(fused.running_mean, bn.running_mean) and fused.num_batches_tracked.item() == 7
    with torch.no_grad():
        fused.weight.mul_(3)
    bn.load_state_dict(fused.state_dict())
    assert torch.equal(bn.weight, fused.weight)
    # A checkpoint from before num_batches_tracked existed (BatchNorm version 1) still loads.
    old = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    BatchNormAddReLU(4).load_state_dict(old, strict=True)


def test_factory_kwargs_and_moves() -> None:
    m = BatchNormAddReLU(3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.int64
    m.float()
    assert m.weight.dtype == m.running_var.dtype == torch.float32
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16 and m.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_module_updates_its_running_stats(backend: str) -> None:
    """Running stats in bf16 (module.to(bf16)) are read and written in their own dtype, updated in
    fp32 and rounded once: within half a bf16 ulp (at most 2^-8 relative) of the float64 update."""
    fused = BatchNormAddReLU(3, backend=backend).to(torch.bfloat16)
    bn = nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) + 2
    fused(x)
    bn(x.double())
    assert fused.running_mean.dtype == torch.bfloat16
    torch.testing.assert_close(fused.running_mean.double(), bn.running_mean, rtol=2**-8, atol=0)
    torch.testing.assert_close(fused.running_var.double(), bn.running_var, rtol=2**-8, atol=0)


def test_float64_runs_on_the_reference_under_auto_only() -> None:
    m = BatchNormAddReLU(3, dtype=torch.float64)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert m(x).dtype == torch.float64
    with pytest.raises(BackendUnavailable, match="float64"):
        BatchNormAddReLU(3, dtype=torch.float64, backend="triton")(x)


def test_pickles_copies_and_reprs() -> None:
    m = BatchNormAddReLU(3, momentum=None, backend="reference")
    m(torch.randn(2, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), copy.deepcopy(m)):
        assert type(loaded) is BatchNormAddReLU and loaded.backend == "reference"
        assert loaded.momentum is None and loaded.num_batches_tracked.item() == 1
        assert torch.equal(loaded.running_var, m.running_var)
    assert repr(m).startswith("BatchNormAddReLU(3, eps=1e-05, momentum=None, affine=True")
    assert repr(m).endswith(", backend='reference')")


def test_unknown_backend_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        BatchNormAddReLU(3, backend="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_in_channels_last_out(backend: str) -> None:
    m = BatchNormAddReLU(4, backend=backend)
    x = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    assert m(x, torch.randn_like(x)).is_contiguous(memory_format=torch.channels_last)


def test_from_batchnorm_shares_state_and_mode() -> None:
    bn = nn.BatchNorm2d(3, momentum=None, eps=1e-3).eval()
    fused = BatchNormAddReLU.from_batchnorm(bn, backend="reference")
    assert not fused.training and fused.momentum is None and fused.eps == 1e-3
    for name in BN_KEYS:
        assert getattr(fused, name) is getattr(bn, name), name
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x, r), torch.relu(bn(x) + r))


def test_importing_resfast_nn_imports_neither_triton_nor_torchvision() -> None:
    code = (
        "import sys, resfast.nn; assert not {'triton', 'torchvision'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
