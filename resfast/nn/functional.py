"""``relu(batch_norm(x) + residual)`` as one op: input checks, backend choice and autograd.

The kernels live in `resfast.kernels.reference_bn` (the specification) and
`resfast.kernels.triton_bn`; the latter is imported only when the triton backend is chosen, so
importing this module never imports Triton.

`batch_norm_add_relu` is the public function. `check_rank`, `check_inputs`, `select_backend`,
`apply_checked` and `kernels` are its steps, shared with the modules (`resfast.nn.modules`,
`resfast.nn.sync`), which check once and then apply.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from resfast import backends
from resfast.kernels import reference_bn

__all__ = ["batch_norm_add_relu"]


def check_rank(x: Tensor) -> None:
    if x.dim() not in (2, 3, 4):
        raise ValueError(
            f"expected 2D (N, C), 3D (N, C, L) or 4D (N, C, H, W) input (got {x.dim()}D input "
            f"of shape {tuple(x.shape)})"
        )


def _check_per_channel(name: str, t: Tensor | None, x: Tensor) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the input of shape {tuple(x.shape)} has "
            f"{x.shape[1]} channels: expected shape ({x.shape[1]},)"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")


def _check_residual(residual: Tensor | None, x: Tensor) -> None:
    if residual is None:
        return
    if residual.shape != x.shape:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)} but the input has shape {tuple(x.shape)}; "
            "they must be equal"
        )
    if residual.dtype != x.dtype:
        raise TypeError(
            f"residual has dtype {residual.dtype} but the input (shape {tuple(x.shape)}) has "
            f"{x.dtype}; they must be equal"
        )
    if residual.device != x.device:
        raise ValueError(
            f"residual (shape {tuple(residual.shape)}) is on {residual.device} but the input "
            f"(shape {tuple(x.shape)}) is on {x.device}"
        )


def check_inputs(
    x: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """Every error the op can raise about its inputs, raised before anything is modified."""
    check_rank(x)
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    _check_residual(residual, x)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_per_channel(name, t, x)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_per_channel(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and x.shape[1] > 0 and x.numel() // x.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


_BN_IMPLEMENTED = backends.implementing("batch_norm_add_relu")


def select_backend(x: Tensor, backend: str) -> str:
    """The backend that runs x for the requested one (errors say why one cannot)."""
    if backend != "auto":  # (for `auto`, choose reads RESFAST_BACKEND and refuses a bad value itself)
        backends.validate(backend)
    return backends.choose(x.device, x.dtype, backend, implemented=_BN_IMPLEMENTED, op="batch_norm_add_relu")


def kernels(backend: str) -> ModuleType:
    """The BN kernel module of an available backend."""
    return backends.kernel_module("batch_norm_add_relu", backend)


# -- the op: kernels behind torch.library custom ops, and an eager fast path -----------------------
#
# Under torch.compile the op is three registered custom ops, opaque to the compiler, with fake
# implementations giving their outputs' shapes, dtypes and strides (so a fused model traces with
# fullgraph=True, and opcheck tests them). The statistics are their own op because torch.library
# cannot give an autograd formula to an op that mutates its inputs (the running stats): `bn_stats`
# mutates and is not differentiated (it gets a detached x); `bn_add_relu_fwd` is functional and
# differentiable, and its backward `bn_add_relu_bwd` accounts for the statistics' dependence on x.
#
# Eagerly, an autograd.Function calls the same kernels without the dispatcher: the custom ops cost
# ~90 us of host time more per layer's forward and backward (measured on the CPU), which small-batch
# GPU training would feel. Both paths share the kernels, the saved tensors and the gradients. The
# native backends go further: their eager layer is one C++ call whose autograd node is C++ too
# (`native_bn.layer`), with this Function's saved tensors and gradients.


def _stats(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, backend: str
) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of the batch per channel, in the compute dtype; running stats updated."""
    return kernels(backend).batch_stats(x, running_mean, running_var, momentum)


def _forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    training: bool,
    backend: str,
) -> Tensor:
    """y normalised with (mean, var); `training` says they are x's own batch statistics, which the
    backward then differentiates through."""
    return kernels(backend).forward(x, residual, weight, bias, mean, var, eps)


def _backward_kernels(
    dy: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    training: bool,
    need_dx: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias); dx is empty when not needed (an op cannot return None)."""
    dx, dz, dweight, dbias = kernels(backend).backward(dy, x, y, weight, mean, var, eps, training, need_dx)
    return x.new_empty(0) if dx is None else dx, dz, dweight, dbias


_bn_stats = torch.library.custom_op("resfast::bn_stats", _stats, mutates_args=("running_mean", "running_var"))
_bn_add_relu_fwd = torch.library.custom_op("resfast::bn_add_relu_fwd", _forward, mutates_args=())
_bn_add_relu_bwd = torch.library.custom_op("resfast::bn_add_relu_bwd", _backward_kernels, mutates_args=())


@_bn_stats.register_fake
def _(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, backend: str):
    mean = x.new_empty(x.shape[1], dtype=reference_bn.compute_dtype(x))
    return mean, torch.empty_like(mean)


@_bn_add_relu_fwd.register_fake
def _(x: Tensor, *args: Any) -> Tensor:
    return torch.empty_like(x)


@_bn_add_relu_bwd.register_fake
def _(dy: Tensor, x: Tensor, y: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float,
      training: bool, need_dx: bool, backend: str):  # fmt: skip
    dweight = x.new_empty(x.shape[1], dtype=reference_bn.compute_dtype(x))
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(x), dweight, torch.empty_like(dweight)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    """Saves x and y (y > 0 is ReLU's mask; y is usually kept alive by the next layer anyway) and
    the (C,) statistics x was normalised with: never the pre-activation."""
    x, _, weight, bias, mean, var, eps, training, backend = inputs
    ctx.save_for_backward(x, output, weight, mean, var)
    ctx.eps, ctx.training, ctx.backend = eps, training, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx: Any, dy: Tensor, backward: Callable[..., tuple[Tensor, ...]]) -> tuple[Tensor | None, ...]:
    """The gradients of every input, from the saved tensors and `backward` (the op or its kernels)."""
    x, y, weight, mean, var = ctx.saved_tensors
    need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
    dx, dz, dweight, dbias = backward(dy, x, y, weight, mean, var, ctx.eps, ctx.training, need_x, ctx.backend)
    return (
        dx if need_x else None,
        dz if need_residual else None,
        dweight.to(weight.dtype) if need_weight else None,
        dbias.to(ctx.bias_dtype) if need_bias else None,
        *([None] * 5),
    )


@once_differentiable
def _backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    return _grads(ctx, dy, _bn_add_relu_bwd)


_bn_add_relu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBatchNormAddReLU(torch.autograd.Function):
    """`bn_add_relu_fwd` without the dispatcher (see above); same saved tensors and gradients."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        y = _forward(*inputs)
        _setup_context(ctx, inputs, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        # The op if a compiler traces this backward (compiled autograd), so that it stays opaque.
        return _grads(ctx, dy, _bn_add_relu_bwd if torch.compiler.is_compiling() else _backward_kernels)


def _eager_stats(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, backend: str
) -> tuple[Tensor, Tensor]:
    """`bn_stats` without the dispatcher. Kernels write the running stats behind autograd's back:
    their versions are bumped as the op's declared mutation would, so that a graph which saved them
    (an earlier eval forward) refuses to run backward with the new values."""
    mean, var = _stats(x, running_mean, running_var, momentum, backend)
    torch.autograd.graph.increment_version(tuple(t for t in (running_mean, running_var) if t is not None))
    return mean, var


def apply_checked(
    backend: str,
    x: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """The op on checked inputs, with the chosen backend."""
    if x.numel() == 0:
        # Nothing to normalise: torch's own op gives the empty output, zero parameter gradients and
        # unchanged running stats, exactly as the unfused expression would.
        out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch.relu(out if residual is None else out + residual)
    compiling = torch.compiler.is_compiling()
    # A kernel module with a `layer` (the native one: resfast.kernels.native_bn) runs the whole eager
    # layer, its autograd included, in C++.
    layer = None if compiling else getattr(kernels(backend), "layer", None)
    if layer is not None:
        return layer(x, residual, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        stats = _bn_stats if compiling else _eager_stats
        mean, var = stats(x.detach(), running_mean, running_var, momentum, backend)
    else:
        assert running_mean is not None and running_var is not None
        mean, var = running_mean, running_var
    forward = _bn_add_relu_fwd if compiling else _EagerBatchNormAddReLU.apply
    return forward(x, residual, weight, bias, mean, var, eps, training, backend)


def batch_norm_add_relu(
    x: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    + residual)`` in one op; ``relu(F.batch_norm(...))`` when residual is None.

    Same semantics and argument order as `torch.nn.functional.batch_norm` (training normalises with
    the batch's biased variance and, when running stats are given, updates them in place with the
    unbiased one). x is (N, C), (N, C, L) or (N, C, H, W), any memory format; residual has x's shape,
    dtype and device; the output has x's dtype and memory format. bf16/fp16 inputs are normalised
    with fp32 statistics. `backend` is one of `resfast.backends.BACKENDS`.

    Raises ValueError for a wrong rank, channel count or residual shape/device, TypeError for a
    residual dtype mismatch, before any running stat changes. Double backward is not supported.
    """
    check_inputs(x, residual, running_mean, running_var, weight, bias, training, eps)
    return apply_checked(
        select_backend(x, backend),
        x,
        residual,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
    )
