"""Plain-PyTorch specification of ``y = relu(batch_norm(x) + residual)``: forward and backward.

Every fast backend of the fused op implements the same three functions (`batch_stats`, `forward`,
`backward`) with the same arguments and results, and is tested against this module (which is itself
tested against PyTorch's unfused expression in float64). Tensors are viewed as (N, C, *spatial):
statistics are per channel, over the batch and spatial dimensions. Inputs in bf16/fp16 are computed
in fp32 and stored back in their dtype, so the fp32 statistics of the fast kernels are the
specification, not an approximation of it.

Backward maths (what the fast kernels implement, per channel, over the M = N * prod(spatial) values):

    xhat = (x - mean) * invstd,   invstd = 1 / sqrt(var + eps)
    z    = xhat * weight + bias + residual,   y = relu(z)
    dz   = dy * (y > 0)                          ReLU's mask, read from the saved output
    dresidual = dz
    dbias     = sum(dz)
    dweight   = sum(dz * xhat)
    dx = weight * invstd * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)   training: mean and var
                                                                             depend on x
    dx = weight * invstd * dz                                                eval: running stats
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["backward", "batch_stats", "compute_dtype", "forward", "grad_input", "update_running_stats"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the statistics and arithmetic: fp32 for fp32/bf16/fp16 inputs, float64 for float64
    ones (every backend and the op's fake implementations use this)."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A (C,) tensor shaped to broadcast against x's (N, C, *spatial)."""
    return t.view(-1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int | Tensor, momentum: float
) -> None:
    """nn.BatchNorm2d's update from batch statistics over `count` values per channel: exponential
    average, with the unbiased variance. Computed in the statistics' dtype and rounded once to the
    buffers' (which may be bf16)."""
    unbiased_var = var * (count / (count - 1))
    running_mean.copy_(running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
    running_var.copy_(running_var.to(var.dtype) * (1 - momentum) + unbiased_var * momentum)


def _like(x: Tensor, t: Tensor) -> Tensor:
    """t rounded to x's dtype, in `torch.empty_like(x)`'s layout (what the ops' fake implementations
    promise torch.compile): a dense x's own strides, whatever the other inputs' layouts."""
    t = t.to(x.dtype)
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def batch_stats(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor]:
    """(mean, var): x's batch mean and biased variance per channel, in the compute dtype. Running
    stats, when given, are updated in place (with the unbiased variance)."""
    var, mean = torch.var_mean(x.to(compute_dtype(x)), _reduce_dims(x), correction=0)
    if running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return mean, var


def forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
) -> Tensor:
    """y = relu((x - mean) / sqrt(var + eps) * weight + bias + residual), in x's dtype and layout
    (`torch.empty_like(x)`'s strides, whatever the residual's). mean and var are the batch's
    (training, from `batch_stats`) or the running stats (eval)."""
    ct = compute_dtype(x)
    z, _ = _normalized(x, mean, var, eps)
    if weight is not None:
        z = z * _per_channel(weight.to(ct), x)
    if bias is not None:
        z = z + _per_channel(bias.to(ct), x)
    if residual is not None:
        z = z + residual.to(ct)
    return _like(x, torch.relu(z))


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
    """(dx or None, dresidual, dweight, dbias) for the saved (x, y, mean, var) of `forward`.

    dx and dresidual (= dz) are in x's dtype and layout (`torch.empty_like(x)`'s strides); dweight
    and dbias are per-channel sums in the compute dtype (the caller casts them to the parameters'
    dtypes).
    """
    ct = compute_dtype(x)
    dz = torch.where(y > 0, dy, 0).to(ct)
    xhat, invstd = _normalized(x, mean, var, eps)
    dims = _reduce_dims(x)
    sum_dz = dz.sum(dims)
    sum_dz_xhat = (dz * xhat).sum(dims)
    dx = None
    if need_dx and training:
        dx = _grad_input(dz, x, xhat, invstd, weight, sum_dz, sum_dz_xhat, x.numel() // x.shape[1])
    elif need_dx:
        dx = _like(x, dz * _per_channel(_scale(invstd, weight), x))
    return dx, _like(x, dz), sum_dz_xhat, sum_dz


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
    """Training's dx (x's dtype and layout) from dz = dresidual and the per-channel sums of dz and
    dz * xhat over the `count` values per channel that mean and var were computed from: x's own
    (`backward`), or every process's batch when the statistics were synchronised (SyncBatchNorm)."""
    xhat, invstd = _normalized(x, mean, var, eps)
    return _grad_input(dz.to(xhat.dtype), x, xhat, invstd, weight, sum_dz, sum_dz_xhat, count)


def _grad_input(
    dz: Tensor,
    x: Tensor,
    xhat: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    count: int | Tensor,
) -> Tensor:
    """`grad_input` with xhat and invstd already computed (and dz in the compute dtype)."""
    dxhat = dz - _per_channel(sum_dz / count, x) - xhat * _per_channel(sum_dz_xhat / count, x)
    return _like(x, dxhat * _per_channel(_scale(invstd, weight), x))


def _normalized(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(xhat, invstd) in the compute dtype."""
    ct = compute_dtype(x)
    invstd = torch.rsqrt(var.to(ct) + eps)
    return (x.to(ct) - _per_channel(mean.to(ct), x)) * _per_channel(invstd, x), invstd


def _scale(invstd: Tensor, weight: Tensor | None) -> Tensor:
    """weight * invstd, which maps x - mean to the output's normalised part, and dxhat to dx."""
    return invstd if weight is None else invstd * weight.to(invstd.dtype)
