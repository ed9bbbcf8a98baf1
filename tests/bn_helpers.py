"""Shared helpers of the test_bn_* modules: inputs in every layout, the unfused PyTorch expression,
tolerances, and poisoned allocations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resfast import backends

# How a test tensor sits in memory:
# - nchw: contiguous.
# - channels_last: channels innermost (for 4-D, torch.channels_last).
# - sliced: every other channel of a larger tensor: not contiguous, but walkable in place.
# - cropped: the last dim cut short, so the spatial dims cannot be flattened into one stride
#   (4-D only; the Triton launcher copies it).
LAYOUTS = ("nchw", "channels_last", "sliced", "cropped")


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
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator, offset: float = 0.0
) -> Tensor:
    """A leaf tensor of `shape` in `layout`, values randn * 2 + offset rounded to `dtype`."""
    n, c, *spatial = shape
    if layout == "nchw":
        t = torch.randn(shape, generator=gen)
    elif layout == "channels_last":
        t = torch.randn(n, *spatial, c, generator=gen).movedim(-1, 1)
    elif layout == "sliced":
        t = torch.randn(n, 2 * c, *spatial, generator=gen)[:, 1::2]
    elif layout == "cropped" and len(spatial) == 2:
        t = torch.randn(n, c, spatial[0], spatial[1] + 3, generator=gen)[..., : spatial[1]]
    else:
        raise ValueError(f"layout {layout!r} for shape {shape}")
    t.mul_(2).add_(offset)
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
