"""Shared helpers of the test_bn_* modules: inputs in every layout, the unfused PyTorch expression,
tolerances, and poisoned allocations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resfast import backends
from resfast.kernels import reference_bn

# How a test tensor sits in memory:
# - nchw: contiguous.
# - channels_last: channels innermost (for 4-D, torch.channels_last).
# - sliced: every other channel of a larger tensor: not contiguous, but walkable in place.
# - cropped: the last dim cut short, so the spatial dims cannot be flattened into one stride
#   (4-D only; the Triton launcher copies it).
LAYOUTS = ("nchw", "channels_last", "sliced", "cropped")
# Beyond LAYOUTS, for the native drivers: nchw and channels_last starting one element into their
# storage (dense, but no address 16-byte aligned: the CUDA driver's scalar path).
OFFSET_LAYOUTS = ("offset", "offset_channels_last")


def backend_marks(name: str) -> tuple:
    """A BN backend's test marks: the native `cpu` one skips, saying why, where the extension is not
    built (the Triton ones run on the CPU under TRITON_INTERPRET=1, as the suite is run)."""
    if name == "cpu" and (why := backends.native_extension()[1]) is not None:
        return (pytest.mark.skip(reason=f"native extension not built: {why}"),)
    return ()


def backend_params(names: tuple[str, ...]) -> list:
    """The BN backends as test parameters, with `backend_marks`."""
    return [pytest.param(name, marks=backend_marks(name), id=name) for name in names]


def available_backends(names: tuple[str, ...]) -> tuple[str, ...]:
    """The backends of `names` that can run here (for tests that loop over backends)."""
    return tuple(name for name in names if not backend_marks(name))


def make(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    gen: torch.Generator,
    offset: float = 0.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A leaf tensor of `shape` in `layout` on `device`, values randn * 2 + offset (drawn on the CPU,
    so every device gets the same ones) rounded to `dtype`. The offset layouts are rounded before
    they are viewed, so that 16-bit ones stay misaligned too; the others are rounded to a fresh
    tensor of the same strides when dense (contiguous otherwise)."""
    n, c, *spatial = shape
    if layout == "nchw":
        base, view = torch.randn(shape, generator=gen), lambda b: b
    elif layout == "channels_last":
        base, view = torch.randn(n, *spatial, c, generator=gen), lambda b: b.movedim(-1, 1)
    elif layout == "sliced":
        base, view = torch.randn(n, 2 * c, *spatial, generator=gen), lambda b: b[:, 1::2]
    elif layout == "cropped" and len(spatial) == 2:
        base = torch.randn(n, c, spatial[0], spatial[1] + 3, generator=gen)
        view = lambda b: b[..., : spatial[1]]  # noqa: E731
    elif layout == "offset":
        base, view = torch.randn(math.prod(shape) + 1, generator=gen), lambda b: b[1:].view(shape)
    elif layout == "offset_channels_last":
        base = torch.randn(math.prod(shape) + 1, generator=gen)
        view = lambda b: b[1:].view(n, *spatial, c).movedim(-1, 1)  # noqa: E731
    else:
        raise ValueError(f"layout {layout!r} for shape {shape}")
    base.mul_(2).add_(offset)
    if layout in OFFSET_LAYOUTS:
        return view(base.to(device, dtype)).detach()
    t = view(base.to(device))
    return t.to(dtype).detach() if dtype != torch.float32 else t.detach()


def unfused(
    x: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """The expression the fused op replaces, in PyTorch's own ops."""
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(out if residual is None else out + residual)


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_float64(
    actual: Tensor, expected: Tensor, torch_same_dtype: Tensor, what: str, count: int, scale: float = 0.0
) -> None:
    """actual's max error against the float64 result is at most 2x PyTorch's own error in actual's
    dtype (the unfused expression computed at that precision), plus a floor for when PyTorch happens
    to be (nearly) exact: 2x the larger of one rounding to actual's dtype and the error of an fp32
    reduction over `count` values (~log2(count) roundings), relative to the result's magnitude,
    or to `scale` when larger (the magnitude of the terms a result is a difference of: dx, with few
    values per channel, is a near-cancellation of weight * invstd * dz).
    NaN always fails."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    rounding = max(torch.finfo(actual.dtype).eps, math.log2(max(count, 2)) * torch.finfo(torch.float32).eps)
    floor = 2 * rounding * max(1.0, scale, expected.abs().max().item() if expected.numel() else 0.0)
    err, torch_err = max_error(actual, expected), max_error(torch_same_dtype, expected)
    assert err <= 2 * torch_err + floor, (
        f"{what}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"
    )


def assert_stats_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """Running stats are fp32 reductions of the same rounded inputs: close to float64 to ~1e-6."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6, msg=what)


@pytest.fixture(autouse=False)
def poisoned_memory():
    """torch.empty* returns NaN-filled tensors meanwhile, so any output element a kernel forgets to
    write fails the comparison instead of passing by luck."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(before)


def values_per_channel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) // shape[1]


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same memory layout: equal strides along every dim longer than 1 (others' are arbitrary)."""
    return a.shape == b.shape and all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1
    )


def model_results(model: torch.nn.Module, x: Tensor, training: bool) -> dict[str, Tensor]:
    """Output, every parameter's gradient and every buffer after one forward and backward."""
    model.train(training)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    results = {"output": out.detach()}
    results |= {f"{name}.grad": p.grad for name, p in model.named_parameters()}
    return results | dict(model.named_buffers())


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Max error over the largest magnitude: activations and gradients of deep nets span many
    scales, and what matters is the error against the tensor's own scale."""
    return max_error(actual, expected) / max(expected.abs().max().item(), 1e-30)


def assert_results_close(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        assert torch.isfinite(value).all(), f"{name}: non-finite values"
        if value.is_floating_point():
            err = relative_error(value, expected[name])
            assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"
        else:
            assert torch.equal(value, expected[name]), name


def assert_results_as_accurate(
    actual: dict[str, Tensor], torch_same_dtype: dict[str, Tensor], truth: dict[str, Tensor], floor: float
) -> None:
    """Each result's relative error against the float64 truth is at most 2x that of PyTorch's unfused
    model in the same dtype, plus `floor` (for when PyTorch happens to be nearly exact)."""
    assert actual.keys() == truth.keys()
    for name, value in actual.items():
        assert torch.isfinite(value).all(), f"{name}: non-finite values"
        if not value.is_floating_point():
            assert torch.equal(value, truth[name]), name
            continue
        err, torch_err = (
            relative_error(value, truth[name]),
            relative_error(torch_same_dtype[name], truth[name]),
        )
        assert err <= 2 * torch_err + floor, (
            f"{name}: relative error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:g}"
        )


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running stats, so eval mode and the ReLU masks are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


class CudaDriverOnHost:
    """The native BN functions (`resfast.kernels.native_bn`'s signatures) over the CUDA driver compiled
    for the host, torch.ops.resfast_cuda_on_host.native_bn_* (csrc/cpu/bn_cuda_on_host.cpp): the GPU's
    plan, vector/scalar split, block reductions and ticketed merge, run on CPU tensors."""

    def __init__(self) -> None:
        import resfast.kernels.native_bn  # noqa: F401  (loads the extension, registers fake impls)

        self.ops = torch.ops.resfast_cuda_on_host

    def batch_stats(self, x, running_mean, running_var, momentum):
        return self.ops.native_bn_stats_(x, running_mean, running_var, momentum)

    def forward(self, x, residual, weight, bias, mean, var, eps):
        return self.ops.native_bn_forward(x, residual, weight, bias, mean, var, eps)

    def backward(self, dy, x, y, weight, mean, var, eps, training, need_dx):
        dx, dz, dweight, dbias = self.ops.native_bn_backward(
            dy, x, y, weight, mean, var, eps, training, need_dx
        )
        return dx if need_dx else None, dz, dweight, dbias

    def grad_input(self, dz, x, weight, mean, var, eps, sum_dz, sum_dz_xhat, count):
        if not isinstance(count, Tensor):
            count = torch.tensor(float(count))
        return self.ops.native_bn_grad_input(dz, x, weight, mean, var, eps, sum_dz, sum_dz_xhat, count)


# The native drivers the CPU tests run: the CPU one, and the CUDA one's logic on the host.
NATIVE_DRIVERS = ("cpu", "cuda-kernel-on-host")


def native_kernels(driver: str):
    """The kernel functions of a native driver of NATIVE_DRIVERS; skips the test when the CUDA
    driver cannot run on this host (it needs FMA instructions to reproduce the GPU's arithmetic)."""
    if driver == "cpu":
        return backends.kernel_module("batch_norm_add_relu", "cpu")
    kernels = CudaDriverOnHost()
    try:
        kernels.batch_stats(torch.ones(2, 1), None, None, 0.1)
    except RuntimeError as e:
        pytest.skip(str(e))
    return kernels


# ---- one layer's forward and backward through a kernel module, checked against float64 --------------


def layer_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    residual: bool,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor | None]:
    """x (and the residual) in `layout`, dy contiguous, fp32 per-channel tensors, drawn from `seed`.
    Offset 3 exercises the centring; running stats near the batch's keep eval's ReLU mask mixed."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    t = {
        "x": make(shape, dtype, layout, gen, offset=3.0, device=device),
        "residual": make(shape, dtype, layout, gen, device=device) if residual else None,
        "weight": torch.randn(C, generator=gen) * 0.5 + 1,
        "bias": torch.randn(C, generator=gen),
        "running_mean": 3 + 0.3 * torch.randn(C, generator=gen),
        "running_var": 4 * (0.8 + 0.4 * torch.rand(C, generator=gen)),
        "dy": make(shape, dtype, "nchw", gen, device=device),
    }
    return {k: v if v is None or v.device == torch.device(device) else v.to(device) for k, v in t.items()}


def layer_case_id(case: tuple) -> str:
    """The id of a (shape, layout, dtype, training, residual) layer case; also its inputs' seed."""
    shape, layout, dtype, training, residual = case
    return (
        f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}-{'train' if training else 'eval'}"
        f"-{'residual' if residual else 'none'}"
    )


def run_layer(kernels, t: dict, training: bool, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every output of one layer's forward and backward through a kernel module's functions, on the
    inputs cast to `dtype`, or as they are (layout and storage offset included) when None; the
    running statistics, which the forward updates, are copies."""

    def cast(v: Tensor | None) -> Tensor | None:
        return None if v is None or dtype is None else v.to(dtype)

    x, residual, dy = (cast(t[k]) if dtype is not None else t[k] for k in ("x", "residual", "dy"))
    weight, bias = (cast(t[k]) if dtype is not None else t[k] for k in ("weight", "bias"))
    rm, rv = (cast(t[k]) if dtype is not None else t[k].clone() for k in ("running_mean", "running_var"))
    if training:
        mean, var = kernels.batch_stats(x, rm, rv, 0.1)
    else:
        mean, var = rm, rv
    y = kernels.forward(x, residual, weight, bias, mean, var, 1e-5)
    dx, dz, dweight, dbias = kernels.backward(dy, x, y, weight, mean, var, 1e-5, training, True)
    out = {"y": y, "dx": dx, "dresidual": dz, "dweight": dweight, "dbias": dbias}
    if training:
        out |= {"mean": mean, "var": var, "running_mean": rm, "running_var": rv}
    return out


def term_scales(t: dict, truth: dict, training: bool) -> dict[str, float]:
    """The magnitude of the terms that results with cancellation are sums or differences of: a sum's
    rounding error is relative to the sum of its terms' magnitudes, not to the (maybe much smaller)
    result, and the kernels sum in another order than the specification. dx is a difference of terms
    of size |weight * invstd * dz|."""
    x = t["x"].double()
    mean, var = (truth["mean"], truth["var"]) if training else (t["running_mean"], t["running_var"])
    view = (-1, *([1] * (x.dim() - 2)))
    invstd = torch.rsqrt(var.double() + 1e-5)
    xhat = (x - mean.double().view(view)) * invstd.view(view)
    dz = truth["dresidual"].abs()
    dims = (0, *range(2, x.dim()))
    return {
        "dweight": (dz * xhat.abs()).sum(dims).max().item(),
        "dbias": dz.sum(dims).max().item(),
        "dx": (t["weight"].abs().double() * invstd).max().item() * dz.max().item(),
    }


def check_layer(kernels, t: dict, training: bool, dense: bool) -> None:
    """A layer's outputs through `kernels` against the specification evaluated in float64 (the rule
    of `assert_close_to_float64`, torch's own error being the specification's in the input's dtype);
    their dtypes; activations in torch.empty_like(x)'s layout (x's own when `dense`); statistics and
    running statistics within `assert_stats_close`, the running ones updated."""
    x = t["x"]
    got = run_layer(kernels, t, training)
    truth = run_layer(reference_bn, t, training, torch.float64)
    spec = run_layer(reference_bn, t, training)
    count = values_per_channel(tuple(x.shape))
    for name in ("y", "dx", "dresidual"):
        assert got[name].dtype == x.dtype, name
        assert got[name].stride() == torch.empty_like(x).stride(), f"{name}: not empty_like(x)'s layout"
        if dense:
            assert same_layout(got[name], x), name
    for name in ("dweight", "dbias", *(("mean", "var") if training else ())):
        assert got[name].dtype == torch.float32, name
    scales = term_scales(t, truth, training)
    for name in ("y", "dx", "dresidual", "dweight", "dbias"):
        assert_close_to_float64(got[name], truth[name], spec[name], name, count, scales.get(name, 0.0))
    if training:
        for name in ("mean", "var", "running_mean", "running_var"):
            assert_stats_close(got[name], truth[name], name)
        assert not torch.equal(got["running_mean"], t["running_mean"]), "running stats not updated"
