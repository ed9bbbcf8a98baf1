"""Hardening of the fused BatchNorm + add + ReLU (issue 10): random shapes x layouts x dtypes x modes
(property tests), NaN/Inf, run-to-run reproducibility, and the regressions found on the way.

Property test: `BatchNormAddReLU` on the triton and cpu backends against the reference backend, all against
PyTorch's unfused ``relu(nn.BatchNorm(x) + residual)`` computed in float64, on the output, every
gradient and every buffer. Shapes are 2-D, 3-D and 4-D with sizes 1 to 5 (N = 1, C = 1, H = W = 1 and
odd sizes); x, the residual and the incoming gradient each take any layout of ``_LAYOUTS``
independently; fp32, bf16, fp16; train/eval, affine on/off, track_running_stats on/off, momentum None
(cumulative average) or a float, residual or None.

Tolerances (the rule of tests/test_bn_add_relu.py): each result's error against float64 is at most 2x
PyTorch's own error in the same dtype, plus a floor of two roundings (`assert_close_to_float64`) of
the result's magnitude, or for dx of its terms' (`_dx_scale`: torch's CPU kernel accumulates fp32 in
double, so with 2 values per channel, where dx cancels to ~0, its error is no guide);
triton and reference, which compute the same fp32 formula in different orders, differ by at most
that same budget; running stats are fp32 reductions of the same rounded inputs (`assert_stats_close`);
num_batches_tracked is exact.

Profiles: ``ci`` (the default: 20 examples, derandomized so CI is reproducible) and ``long`` (500
random examples), chosen by RESFAST_HYPOTHESIS_PROFILE, e.g.
``RESFAST_HYPOTHESIS_PROFILE=long TRITON_INTERPRET=1 pytest tests/test_bn_hardening.py``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from resfast.nn import BatchNormAddReLU
from resfast.nn.functional import batch_norm_add_relu
from tests.bn_helpers import (
    assert_close_to_float64,
    assert_stats_close,
    available_backends,
    backend_params,
    make,
    max_error,
    poisoned_memory,  # noqa: F401 (fixture)
    same_layout,
    unfused,
    values_per_channel,
)

pytestmark = pytest.mark.usefixtures("poisoned_memory")

settings.register_profile("resfast-bn-ci", max_examples=20, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("resfast-bn-long", max_examples=500, deadline=None, print_blob=True)
PROFILE = settings.get_profile("resfast-bn-" + os.environ.get("RESFAST_HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ("reference", "triton", "cpu")
BACKEND_PARAMS = backend_params(BACKENDS)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# bn_helpers.LAYOUTS plus "transposed": dense, but not in NCHW order: for 4-D the spatial dims swapped
# (x.transpose(2, 3): not flattenable into one spatial stride, and empty_like keeps it), for 2-D and
# 3-D the batch and channel dims swapped.
_LAYOUTS = ("nchw", "channels_last", "sliced", "cropped", "transposed")


def laid_out(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator, offset: float = 0.0
):
    if layout != "transposed":
        return make(shape, dtype, layout, gen, offset)
    dims = (2, 3) if len(shape) == 4 else (0, 1)
    stored = list(shape)
    stored[dims[0]], stored[dims[1]] = stored[dims[1]], stored[dims[0]]
    t = (torch.randn(stored, generator=gen) * 2 + offset).transpose(*dims)
    return t.to(dtype).detach()


def layouts_for(shape: tuple[int, ...]) -> tuple[str, ...]:
    return _LAYOUTS if len(shape) == 4 else tuple(layout for layout in _LAYOUTS if layout != "cropped")


class Case(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    x_layout: str
    residual_layout: str | None  # None: no residual
    dy_layout: str
    training: bool
    affine: bool
    track_running_stats: bool
    momentum: float | None
    batches_tracked: int  # num_batches_tracked before the step (momentum None weighs the batch by it)
    seed: int


@st.composite
def cases(draw) -> Case:
    ndim = draw(st.sampled_from((2, 3, 4)))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    training, track_running_stats = draw(st.booleans()), draw(st.booleans())
    if (training or not track_running_stats) and values_per_channel(shape) == 1:
        shape = (2, *shape[1:])  # batch statistics: torch refuses one value per channel
    layouts = layouts_for(shape)
    return Case(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        x_layout=draw(st.sampled_from(layouts)),
        residual_layout=draw(st.one_of(st.none(), st.sampled_from(layouts))),
        dy_layout=draw(st.sampled_from(layouts)),
        training=training,
        affine=draw(st.booleans()),
        track_running_stats=track_running_stats,
        momentum=draw(st.sampled_from((None, 0.1, 0.7))),
        batches_tracked=draw(st.sampled_from((0, 3))),
        seed=draw(st.integers(0, 2**16)),
    )


def _modules(case: Case, gen: torch.Generator) -> tuple[BatchNormAddReLU, nn.Module]:
    """Ours (reference backend; the test sets the backend) and torch's, with equal random state."""
    C = case.shape[1]
    ours = BatchNormAddReLU(
        C, momentum=case.momentum, affine=case.affine, track_running_stats=case.track_running_stats
    )
    torch_cls = nn.BatchNorm2d if len(case.shape) == 4 else nn.BatchNorm1d
    theirs = torch_cls(
        C, momentum=case.momentum, affine=case.affine, track_running_stats=case.track_running_stats
    )
    with torch.no_grad():
        if case.affine:
            ours.weight.uniform_(0.5, 1.5, generator=gen)
            ours.bias.normal_(0, 0.5, generator=gen)
        if case.track_running_stats:
            # Near the batch's statistics (x is randn * 2 + 1), so eval's ReLU mask stays mixed.
            ours.running_mean.normal_(1, 0.3, generator=gen)
            ours.running_var.uniform_(3, 5, generator=gen)
            ours.num_batches_tracked.fill_(case.batches_tracked)
    theirs.load_state_dict(ours.state_dict())
    return ours.train(case.training), theirs.train(case.training)


def _step(module: nn.Module, x: Tensor, residual: Tensor | None, dy: Tensor, fused: bool, dtype=None):
    """(y, {name: gradient}, {name: buffer}) of one forward and backward on copies of the inputs."""
    module = copy.deepcopy(module)
    if dtype is not None:
        module = module.to(dtype)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = {"x": cast(x).detach().requires_grad_()}
    if residual is not None:
        leaves["residual"] = cast(residual).detach().requires_grad_()
    if fused:
        y = module(leaves["x"], leaves.get("residual"))
    else:
        out = module(leaves["x"])
        y = torch.relu(out if residual is None else out + leaves["residual"])
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y, [*leaves.values(), *params.values()], cast(dy).to(y.dtype))
    names = [*leaves, *(f"d{name}" for name in params)]
    return y, dict(zip(names, grads, strict=True)), {k: v.clone() for k, v in module.named_buffers()}


def _dx_scale(case: Case, module: BatchNormAddReLU, x: Tensor, dy: Tensor) -> float:
    """max |weight * invstd| * max |dy|: the size of the terms training's dx is a difference of
    (with 2 values per channel they cancel exactly, and only their rounding is left)."""
    dims = (0, *range(2, x.dim()))
    if case.training or not case.track_running_stats:
        var = x.double().var(dims, correction=0)
    else:
        var = module.running_var.double()
    scale = torch.rsqrt(var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return (scale.max() * dy.double().abs().max()).item()


def _assert_as_close_as_torch(
    mine: Tensor, ref: Tensor, truth: Tensor, torch_err: float, what: str, count: int, scale: float = 0.0
):
    """triton vs reference: both fp32 computations of the same formula in another order, so they
    differ by no more than the budget either has against float64 (2x torch's error + the floor)."""
    rounding = max(torch.finfo(mine.dtype).eps, math.log2(max(count, 2)) * torch.finfo(torch.float32).eps)
    floor = 2 * rounding * max(1.0, scale, truth.abs().max().item() if truth.numel() else 0.0)
    err = max_error(mine, ref)
    assert err <= 2 * torch_err + floor, (
        f"{what}: fast backend - reference {err:.3g} > {2 * torch_err + floor:.3g}"
    )


@PROFILE
@given(case=cases())
def test_triton_and_reference_match_unfused_float64(case: Case) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    ours, theirs = _modules(case, gen)
    x = laid_out(case.shape, case.dtype, case.x_layout, gen, offset=1.0)
    residual = (
        None if case.residual_layout is None else laid_out(case.shape, case.dtype, case.residual_layout, gen)
    )
    dy = laid_out(case.shape, case.dtype, case.dy_layout, gen)

    truth = _step(theirs, x, residual, dy, fused=False, dtype=torch.float64)
    same_dtype = _step(theirs, x, residual, dy, fused=False)
    count = values_per_channel(case.shape)
    scales = {"x": _dx_scale(case, ours, x, dy)}
    results = {}
    for backend in available_backends(BACKENDS):
        ours.backend = backend
        y, grads, buffers = results[backend] = _step(ours, x, residual, dy, fused=True)
        assert y.dtype == case.dtype
        # The documented layout: torch.empty_like(x)'s, i.e. x's own when x is dense.
        assert y.stride() == torch.empty_like(x).stride(), f"{backend}: output not in the input's layout"
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
            assert same_layout(y, x)
        assert_close_to_float64(y, truth[0], same_dtype[0], f"{backend} y", count)
        assert grads.keys() == truth[1].keys()
        for name, grad in grads.items():
            assert grad.dtype == (case.dtype if name in ("x", "residual") else torch.float32), name
            assert_close_to_float64(
                grad, truth[1][name], same_dtype[1][name], f"{backend} {name}", count, scales.get(name, 0.0)
            )
        assert buffers.keys() == truth[2].keys()
        for name, buf in buffers.items():
            if buf.is_floating_point():
                assert_stats_close(buf, truth[2][name], f"{backend} {name}")
            else:
                assert torch.equal(buf, truth[2][name]), f"{backend} {name}"

    # Each fast backend against the reference (the specification).
    y_r, g_r, b_r = results["reference"]
    for backend in set(results) - {"reference"}:
        y_t, g_t, b_t = results[backend]
        _assert_as_close_as_torch(y_t, y_r, truth[0], max_error(same_dtype[0], truth[0]), "y", count)
        for name in g_t:
            torch_err = max_error(same_dtype[1][name], truth[1][name])
            _assert_as_close_as_torch(
                g_t[name], g_r[name], truth[1][name], torch_err, name, count, scales.get(name, 0.0)
            )
        for name in b_t:
            torch.testing.assert_close(b_t[name], b_r[name], rtol=1e-5, atol=1e-6, msg=name)


# ---- values: NaN / Inf -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_non_finite_input_propagates_like_torch(
    backend: str, value: float, training: bool, layout: str
) -> None:
    """Same NaN (and Inf) positions as the unfused expression in output, dx, dresidual and running
    stats: in training the value poisons its channel's statistics, so the whole channel; in eval only
    its own element (an Inf gives relu(inf) = inf or 0, not NaN). A kernel that masked non-finite
    lanes, or a ReLU written as max(z, 0), would hide it.

    Known departure, asserted so it cannot drift: torch's CPU kernel sums an Inf into an infinite
    running_mean; Welford's update (here, and in torch.var_mean and torch's CUDA kernel) gives NaN.
    Both poison exactly the same channel."""
    gen = torch.Generator().manual_seed(7)
    shape = (3, 4, 3, 3)
    x = make(shape, torch.float32, layout, gen)
    x[1, 2, 0, 1] = value
    r, dy = make(shape, torch.float32, layout, gen), make(shape, torch.float32, layout, gen)
    stats = (torch.zeros(4), torch.ones(4))

    def run(op):
        rm, rv = (s.clone() for s in stats)
        xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = op(xl, rl, rm, rv, None, None, training)
        return (y, *torch.autograd.grad(y, [xl, rl], dy)), (rm, rv)

    (y, *grads), (rm, rv) = run(lambda *a: batch_norm_add_relu(*a, backend=backend))
    (y_t, *grads_t), (rm_t, rv_t) = run(unfused)
    for name, mine, theirs in zip(("y", "dx", "dresidual"), (y, *grads), (y_t, *grads_t), strict=True):
        assert torch.equal(mine.isnan(), theirs.isnan()), f"{name}: NaN positions differ"
        assert torch.equal(mine.isinf(), theirs.isinf()), f"{name}: Inf positions differ"
    if training:
        assert y[:, 2].isnan().all() and not y[:, [0, 1, 3]].isnan().any(), "not exactly channel 2 poisoned"
    assert torch.equal(rv.isnan(), rv_t.isnan()), "running_var: NaN positions differ"
    assert torch.equal(rm.isfinite(), rm_t.isfinite()), "running_mean: non-finite positions differ"
    finite = rm.isfinite()
    torch.testing.assert_close(rm[finite], rm_t[finite])
    torch.testing.assert_close(rv[rv.isfinite()], rv_t[rv_t.isfinite()])


# ---- values: reproducibility --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_bitwise_reproducible_run_to_run(monkeypatch, backend: str, dtype: torch.dtype) -> None:
    """Twice on the same inputs: output, every gradient and the running stats are bit-identical.
    Several reduction programs (a split that depends on nothing but the shape) so an order that
    depended on scheduling, e.g. atomics, would show."""
    from resfast.kernels import triton_bn

    monkeypatch.setattr(triton_bn, "_TILE", 8)
    monkeypatch.setattr(triton_bn, "_programs_to_fill", lambda device: 5)
    gen = torch.Generator().manual_seed(11)
    shape = (5, 3, 4, 3)
    x, r, dy = (make(shape, dtype, "channels_last", gen, offset=o) for o in (2.0, 0.0, 0.0))
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        rm, rv = torch.zeros(3), torch.ones(3)
        y = batch_norm_add_relu(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], True, backend=backend)
        return [y, *torch.autograd.grad(y, leaves, dy), rm, rv]

    def bits(t: Tensor) -> Tensor:
        return t.contiguous().flatten().view(torch.uint8)

    first, second = run(), run()
    for name, a, b_ in zip(
        ("y", "dx", "dresidual", "dweight", "dbias", "rm", "rv"), first, second, strict=True
    ):
        assert torch.equal(bits(a), bits(b_)), name


# ---- regressions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_input_with_swapped_spatial_dims(backend: str, training: bool) -> None:
    """Regression: x.transpose(2, 3) is dense, so the outputs (empty_like(x)) take its layout, whose
    spatial dims cannot be flattened into one stride; the triton launchers indexed such an output
    with (0, 0, 0) strides (every value written to element 0: the rest garbage, dx NaN)."""
    gen = torch.Generator().manual_seed(12)
    x = laid_out((3, 2, 4, 5), torch.float32, "transposed", gen, offset=1.0).requires_grad_()
    r = laid_out((3, 2, 4, 5), torch.float32, "transposed", gen).requires_grad_()
    dy = torch.randn(x.shape, generator=gen)
    rm, rv = torch.zeros(2), torch.full((2,), 4.0)
    y = batch_norm_add_relu(x, r, rm.clone(), rv.clone(), None, None, training, backend=backend)
    grads = torch.autograd.grad(y, [x, r], dy)
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y64 = unfused(x64, r64, rm.double(), rv.double(), None, None, training)
    grads64 = torch.autograd.grad(y64, [x64, r64], dy.double())
    assert y.stride() == x.stride()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for name, g, g64 in zip(("dx", "dresidual"), grads, grads64, strict=True):
        assert g.stride() == x.stride(), name
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_reads_strided_weight_and_running_stats(backend: str, training: bool) -> None:
    """Regression: the triton backward indexed the saved weight (and, in eval, the running stats it
    normalised with) as ptr + c, so a strided view (weight[::2], e.g. a slice of a packed parameter
    buffer) gave a wrong dx (the forward copied them; the backward did not)."""
    gen = torch.Generator().manual_seed(13)
    C = 3
    w = (torch.rand(2 * C, generator=gen) + 0.5).requires_grad_()  # a packed buffer; the weight is w[::2]
    weight = w[::2]
    rm, rv = (0.3 * torch.randn(2 * C, generator=gen))[::2], (torch.rand(2 * C, generator=gen) + 0.5)[::2]
    x = make((4, C, 3, 3), torch.float32, "nchw", gen, offset=1.0).requires_grad_()
    dy = torch.randn(x.shape, generator=gen)
    stats = (None, None) if training else (rm, rv)  # training: strided running stats are refused by triton
    y = batch_norm_add_relu(x, None, *stats, weight, None, training, backend=backend)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    stats64 = tuple(None if s is None else s.double() for s in stats)
    y64 = unfused(x64, None, *stats64, w64[::2], None, training)
    dx64, dw64 = torch.autograd.grad(y64, [x64, w64], dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)


# ---- bad input (what tests/test_bn_errors.py does not cover) --------------------------------------


def test_triton_refuses_strided_running_stats_before_changing_them() -> None:
    """The triton kernels update the running stats in place as ptr + c: a strided view is refused
    with a clear error, before anything is written (the reference backend updates it in place)."""
    base_mean, base_var = torch.zeros(6), torch.ones(6)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="per-channel tensors with stride 1, got stride 2"):
        batch_norm_add_relu(x, None, base_mean[::2], base_var[::2], None, None, True, backend="triton")
    assert torch.equal(base_mean, torch.zeros(6)) and torch.equal(base_var, torch.ones(6))
    batch_norm_add_relu(x, None, base_mean[::2], base_var[::2], None, None, True, backend="reference")
    expected_mean = 0.1 * x.mean((0, 2, 3))
    torch.testing.assert_close(base_mean[::2], expected_mean)
    assert torch.equal(base_mean[1::2], torch.zeros(3)), "a write landed outside the view"
