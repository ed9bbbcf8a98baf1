"""batch_norm_add_relu against relu(F.batch_norm(...) + residual) in float64: outputs, every
gradient and the running stats, over backends x layouts x dtypes x modes x options x shapes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from itertools import product

import pytest
import torch

from resfast.nn.functional import batch_norm_add_relu
from tests.bn_helpers import (
    LAYOUTS,
    assert_close_to_float64,
    assert_stats_close,
    backend_marks,
    backend_params,
    make,
    poisoned_memory,  # noqa: F401 (fixture)
    same_layout,
    unfused,
    values_per_channel,
)

pytestmark = pytest.mark.usefixtures("poisoned_memory")

BACKENDS = ("reference", "triton", "cpu")
BACKEND_PARAMS = backend_params(BACKENDS)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# C = 1, H = W = 1, N = 1, 2-D, 3-D, odd sizes, the fewest values torch accepts in training (2),
# and enough samples (16) that a Triton reduction program folds several tiles.
BOOLS = (True, False)
SHAPES = ((2, 1, 3, 3), (5, 4, 1, 1), (1, 3, 3, 5), (7, 3), (4, 3, 7), (3, 5, 7, 9), (16, 3, 5, 5), (2, 3))


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: torch.dtype
    layout: str
    shape: tuple[int, ...]
    training: bool = True
    affine: str = "both"  # "both": weight and bias; "weight": weight only; "none"
    running: bool = True  # running stats given (updated in training, used in eval)
    residual: bool = True

    def __str__(self) -> str:
        mode = "train" if self.training else "eval"
        dims = "x".join(map(str, self.shape))
        flags = f"affine={self.affine}-running={self.running}-residual={self.residual}"
        return f"{self.backend}-{str(self.dtype)[6:]}-{self.layout}-{dims}-{mode}-{flags}"


CASES = [
    # every layout and dtype, both modes
    *(
        Case(b, d, layout, (4, 3, 5, 6), training=t)
        for b, d, layout, t in product(BACKENDS, DTYPES, LAYOUTS, (True, False))
    ),
    # every shape, in both memory formats
    *(
        Case(b, torch.float32, layout, shape)
        for b, shape, layout in product(BACKENDS, SHAPES, ("nchw", "channels_last"))
    ),
    # every option (eval needs running stats), in bf16
    *(
        Case(b, torch.bfloat16, "channels_last", (3, 4, 3, 3), training=t, affine=a, running=r, residual=res)
        for b, t, a, r, res in product(
            BACKENDS, (True, False), ("both", "weight", "none"), (True, False), (True, False)
        )
        if t or r
    ),
]


def _inputs(case: Case) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    C = case.shape[1]
    # An offset mean of 3 exercises the centring; running stats near the batch's keep eval's ReLU
    # mask mixed.
    x = make(case.shape, case.dtype, case.layout, gen, offset=3.0)
    return {
        "x": x,
        "residual": make(case.shape, case.dtype, case.layout, gen) if case.residual else None,
        "weight": torch.randn(C, generator=gen) * 0.5 + 1 if case.affine != "none" else None,
        "bias": torch.randn(C, generator=gen) if case.affine == "both" else None,
        "running_mean": 3 + 0.3 * torch.randn(C, generator=gen) if case.running else None,
        "running_var": 4 * (0.8 + 0.4 * torch.rand(C, generator=gen)) if case.running else None,
        "dy": make(case.shape, case.dtype, case.layout, gen),
    }


def _run(op, inputs: dict, dtype: torch.dtype | None, training: bool) -> tuple[torch.Tensor, dict, dict]:
    """(y, gradients by name, running stats by name) of op on copies of the inputs (cast to dtype)."""
    leaves = {}
    for name in ("x", "residual", "weight", "bias"):
        t = inputs[name]
        if t is not None:
            t = t.to(dtype) if dtype is not None else t.detach()
            leaves[name] = t.detach().requires_grad_()
    stats = {
        n: inputs[n].clone().to(dtype or inputs[n].dtype)
        for n in ("running_mean", "running_var")
        if inputs[n] is not None
    }
    y = op(
        leaves["x"],
        leaves.get("residual"),
        stats.get("running_mean"),
        stats.get("running_var"),
        leaves.get("weight"),
        leaves.get("bias"),
        training,
    )
    grads = torch.autograd.grad(y, list(leaves.values()), inputs["dy"].to(y.dtype))
    return y, dict(zip(leaves, grads, strict=True)), stats


@pytest.mark.parametrize("case", [pytest.param(c, marks=backend_marks(c.backend), id=str(c)) for c in CASES])
def test_matches_unfused_float64(case: Case) -> None:
    inputs = _inputs(case)

    def fused(*args):
        return batch_norm_add_relu(*args, backend=case.backend)

    y, grads, stats = _run(fused, inputs, None, case.training)
    y64, grads64, stats64 = _run(unfused, inputs, torch.float64, case.training)
    y_torch, grads_torch, _ = _run(unfused, inputs, None, case.training)

    assert y.dtype == case.dtype
    if case.layout in ("nchw", "channels_last"):
        assert same_layout(y, inputs["x"]), "output not in the input's memory format"
    count = values_per_channel(case.shape)
    assert_close_to_float64(y, y64, y_torch, "y", count)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close_to_float64(grad, grads64[name], grads_torch[name], f"d{name}", count)
    for name, stat in stats.items():
        assert_stats_close(stat, stats64[name], name)
    if case.training and case.running:
        assert not torch.equal(stats["running_mean"], inputs["running_mean"]), "running stats not updated"


def _float64_check(x, residual, weight, bias, running_mean, running_var, training, dy, backend) -> None:
    """The fused op on fp32 inputs agrees with the unfused float64 expression (fp32 tolerances)."""
    inputs = {
        "x": x,
        "residual": residual,
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
        "dy": dy,
    }
    y, grads, stats = _run(lambda *a: batch_norm_add_relu(*a, backend=backend), inputs, None, training)
    y64, grads64, stats64 = _run(unfused, inputs, torch.float64, training)
    y_torch, grads_torch, _ = _run(unfused, inputs, None, training)
    count = values_per_channel(tuple(x.shape))
    assert_close_to_float64(y, y64, y_torch, "y", count)
    for name, grad in grads.items():
        assert_close_to_float64(grad, grads64[name], grads_torch[name], f"d{name}", count)
    for name, stat in stats.items():
        assert_stats_close(stat, stats64[name], name)


@pytest.mark.parametrize("training", BOOLS, ids=["train", "eval"])
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "sliced"))
def test_triton_many_tiles_programs_and_channel_blocks(monkeypatch, layout: str, training: bool) -> None:
    """Tiny tiles and few reduction programs force every path of the kernels: several tiles per
    reduction program, uneven splits, several channel blocks with a partial last one, and a
    finalize kernel spread over several programs."""
    from resfast.kernels import triton_bn

    monkeypatch.setattr(triton_bn, "_TILE", 8)
    monkeypatch.setattr(triton_bn, "_MAX_BLOCK_S", 4)
    monkeypatch.setattr(triton_bn, "_MAX_BLOCK_C", 2)
    monkeypatch.setattr(triton_bn, "_FINALIZE_BLOCK_C", 2)
    monkeypatch.setattr(triton_bn, "_programs_to_fill", lambda device: 7)
    gen = torch.Generator().manual_seed(1)
    shape = (6, 5, 3, 7)
    x, r, dy = (make(shape, torch.float32, layout, gen, offset=3.0) for _ in range(3))
    w, b = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    _float64_check(
        x, r, w, b, 3 + torch.rand(5, generator=gen), 4 + torch.rand(5, generator=gen), training, dy, "triton"
    )


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_mixed_layouts(backend: str) -> None:
    """x channels_last, residual NCHW, dy sliced: each tensor is read through its own strides."""
    gen = torch.Generator().manual_seed(2)
    shape = (3, 4, 5, 3)
    x = make(shape, torch.float32, "channels_last", gen, offset=3.0)
    r = make(shape, torch.float32, "nchw", gen)
    dy = make(shape, torch.float32, "sliced", gen)
    _float64_check(
        x, r, torch.rand(4, generator=gen), torch.rand(4, generator=gen), None, None, True, dy, backend
    )


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_statistics_of_large_mean_small_spread(backend: str) -> None:
    """mean 1000, std 0.01: sum(x^2) - sum(x)^2 / M in fp32 would lose every digit of the variance
    (1e6 against 1e-4); the Welford/Chan combination keeps it to a few fp32 ulps of the mean."""
    gen = torch.Generator().manual_seed(3)
    x = 1000 + 0.01 * torch.randn(8, 3, 6, 5, generator=gen)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm_add_relu(x, None, rm, rv, None, None, True, 1.0, backend=backend)
    var64 = x.double().var((0, 2, 3))  # momentum 1: running_var is the unbiased batch variance
    torch.testing.assert_close(rv.double(), var64, rtol=2e-3, atol=0)
    y64 = unfused(x.double(), None, None, None, None, None, True)
    # y = (x - mean) / std: x's own fp32 rounding (ulp(1000) / 0.01 = 6e-3) bounds the accuracy.
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_expanded_output_gradient(backend: str) -> None:
    """y.sum() gives a stride-0 gradient; the kernels read it in place."""
    gen = torch.Generator().manual_seed(4)
    x = make((4, 3, 2, 5), torch.float32, "channels_last", gen, offset=1.0).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    batch_norm_add_relu(x, None, None, None, training=True, backend=backend).sum().backward()
    unfused(x64, None, None, None, None, None, True).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("needed", [("residual",), ("weight", "bias"), ("x",), ("bias",)], ids="+".join)
def test_only_requested_gradients(backend: str, needed: tuple[str, ...]) -> None:
    """Gradients are returned for exactly the inputs that require them, and are right."""
    gen = torch.Generator().manual_seed(5)
    shape = (3, 4, 3, 3)
    t = {
        "x": make(shape, torch.float32, "nchw", gen, offset=2.0),
        "residual": make(shape, torch.float32, "nchw", gen),
    }
    t |= {"weight": torch.rand(4, generator=gen) + 0.5, "bias": torch.randn(4, generator=gen)}
    dy = torch.randn(shape, generator=gen)
    ours = {k: v.clone().requires_grad_(k in needed) for k, v in t.items()}
    ref = {k: v.double().requires_grad_(k in needed) for k, v in t.items()}
    args = ("x", "residual")
    y = batch_norm_add_relu(
        *(ours[k] for k in args), None, None, ours["weight"], ours["bias"], True, backend=backend
    )
    y64 = unfused(*(ref[k] for k in args), None, None, ref["weight"], ref["bias"], True)
    grads = torch.autograd.grad(y, [ours[k] for k in needed], dy)
    grads64 = torch.autograd.grad(y64, [ref[k] for k in needed], dy.double())
    for name, g, g64 in zip(needed, grads, grads64, strict=True):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_nan_propagates_like_torch(backend: str) -> None:
    """A NaN in x poisons its channel's statistics: the whole channel is NaN, as in PyTorch (a ReLU
    written as max(z, 0) would turn it into zeros and hide it)."""
    x = torch.randn(2, 3, 4, 4)
    x[1, 1, 2, 3] = float("nan")
    y = batch_norm_add_relu(x, torch.randn_like(x), None, None, training=True, backend=backend)
    assert y[:, 1].isnan().all()
    assert not y[:, [0, 2]].isnan().any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_batch_like_torch(backend: str) -> None:
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    rm, rv = torch.full((3,), 2.0), torch.full((3,), 3.0)
    y = batch_norm_add_relu(x, torch.zeros(0, 3, 4, 4), rm, rv, w, None, True, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(3))
    assert torch.equal(rm, torch.full((3,), 2.0)) and torch.equal(rv, torch.full((3,), 3.0))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_no_channels_like_torch(backend: str) -> None:
    """Regression: zero channels in training divided by zero in the input checks; torch gives an empty
    output (and an empty grad)."""
    x = torch.randn(2, 0, 3, 3, requires_grad=True)
    y = batch_norm_add_relu(x, torch.zeros(2, 0, 3, 3), None, None, training=True, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape == x.grad.shape


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_double_backward_is_refused(backend: str) -> None:
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    (gx,) = torch.autograd.grad(
        batch_norm_add_relu(x, None, None, None, training=True, backend=backend).pow(2).sum(),
        x,
        create_graph=True,
    )
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
