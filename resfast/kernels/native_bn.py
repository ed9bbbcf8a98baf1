"""The native ``cpu`` and ``cuda`` backends of ``y = relu(batch_norm(x) + residual)``: C++ kernels
(``csrc/cpu/bn.cpp`` for CPU tensors, ``csrc/cuda/bn.cu`` for CUDA ones; maths in ``csrc/bn_math.h``)
behind the ops ``torch.ops.resfast.native_bn_*``, which dispatch on the tensors' device.

Same functions, arguments and results as `reference_bn` (the specification). Each function is one
native call, so a layer's training forward is two calls (statistics, then normalise) and its
backward one (both passes, the per-channel sums merged in between); nothing is computed in Python per
call (on CUDA: one kernel launch per call, two for the backward). Importing this module loads the
extension; `resfast.backends` only routes here when it loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

import resfast._C  # registers torch.ops.resfast.*

__all__ = ["backward", "batch_stats", "forward", "grad_input", "layer"]

_ops = torch.ops.resfast
# The overloads themselves: calling one skips the packet's overload resolution on every call.
_stats = _ops.native_bn_stats_.default
_forward = _ops.native_bn_forward.default
_backward = _ops.native_bn_backward.default
_grad_input = _ops.native_bn_grad_input.default


# Fake implementations: outputs as the C++ ops allocate them (at::empty_like(x) for activations, fp32
# (C,) statistics), so that torch.compile can trace the ops and opcheck can compare. The same ops are
# also registered in `resfast_cuda_on_host`: the CUDA driver compiled for the host, which the CPU tests
# run (csrc/cpu/bn_cuda_on_host.cpp).
def _stats_fake(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float):
    mean = x.new_empty(x.shape[1], dtype=torch.float32)
    return mean, torch.empty_like(mean)


def _forward_fake(x: Tensor, residual, weight, bias, mean, var, eps):
    return torch.empty_like(x)


def _backward_fake(dy: Tensor, x: Tensor, y, weight, mean, var, eps, training, need_dx):
    dweight = x.new_empty(x.shape[1], dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(x), dweight, torch.empty_like(dweight)


def _grad_input_fake(dz: Tensor, x: Tensor, weight, mean, var, eps, sum_dz, sum_dz_xhat, count):
    return torch.empty_like(x)


for _namespace in ("resfast", "resfast_cuda_on_host"):
    torch.library.register_fake(f"{_namespace}::native_bn_stats_")(_stats_fake)
    torch.library.register_fake(f"{_namespace}::native_bn_forward")(_forward_fake)
    torch.library.register_fake(f"{_namespace}::native_bn_backward")(_backward_fake)
    torch.library.register_fake(f"{_namespace}::native_bn_grad_input")(_grad_input_fake)


def batch_stats(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor]:
    """fp32 (mean, biased var) of x per channel, as `reference_bn.batch_stats`; updates the running
    stats in place when given."""
    return _stats(x, running_mean, running_var, momentum)


def forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
) -> Tensor:
    """y, as `reference_bn.forward` (x's dtype, `torch.empty_like(x)`'s layout)."""
    return _forward(x, residual, weight, bias, mean, var, eps)


def backward(
    dy: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    training: bool,
    need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """(dx or None, dresidual, dweight, dbias), as `reference_bn.backward`; dweight, dbias fp32."""
    dx, dz, dweight, dbias = _backward(dy, x, y, weight, mean, var, eps, training, need_dx)
    return dx if need_dx else None, dz, dweight, dbias


def grad_input(
    dz: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    count: int | Tensor,
) -> Tensor:
    """Training's dx from given per-channel sums over `count` values, as `reference_bn.grad_input`."""
    if not isinstance(count, Tensor):
        count = torch.tensor(float(count))
    return _grad_input(dz, x, weight, mean, var, eps, sum_dz, sum_dz_xhat, count)


def layer(
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
    """A whole layer on checked inputs, eagerly, its autograd in C++ (csrc/bn_autograd.cpp): the
    statistics and the normalisation forward, the backward node calling `backward`'s op; the same
    gradients as resfast.nn.functional's Python autograd.Function, one Python call per layer."""
    return resfast._C.bn_add_relu(
        x, residual, running_mean, running_var, weight, bias, training, momentum, eps
    )
