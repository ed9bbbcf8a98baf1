"""`SyncBatchNormAddReLU`: the fused op with nn.SyncBatchNorm's semantics across processes.

In training, each process reduces its batch to per-channel (mean, biased variance, count), the
processes all-gather these, and every process combines them into the statistics of the whole
distributed batch (Chan et al.'s parallel formula: no sum-of-squares cancellation), which normalise x
and update the running stats. Backward all-reduces the per-channel sums of dz and dz * xhat, so dx is
the whole batch's; dweight and dbias stay this process's sums, which DDP averages like any other
gradient (as nn.SyncBatchNorm leaves them). Eval mode, and a single process, use the plain op.

The synchronised path is an autograd.Function that calls collectives: it runs eagerly (a model using it
is not meant for torch.compile with fullgraph=True).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from resfast.kernels import reference_bn
from resfast.nn import functional
from resfast.nn.modules import BatchNormAddReLU

if TYPE_CHECKING:
    from types import ModuleType

    from torch.distributed import ProcessGroup

__all__ = ["SyncBatchNormAddReLU", "convert_sync_batchnorm"]


def _global_stats(
    kernels: ModuleType, x: Tensor, group: ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, count) per channel over every process's batch, in the compute dtype.

    A process with an empty batch still takes part (count 0), or the others would wait for it forever.
    Counts are carried in the statistics' dtype: exact up to 2^24 values per channel and process."""
    count = x.numel() // x.shape[1]
    if count:
        mean, var = kernels.batch_stats(x, None, None, 0.0)
    else:
        mean = var = x.new_zeros(x.shape[1], dtype=reference_bn.compute_dtype(x))
    local = torch.stack([mean, var, torch.full_like(mean, count)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    means, variances, counts = torch.stack(gathered).unbind(1)  # each (world, C)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return mean, var, total


class _SyncBatchNormAddReLU(torch.autograd.Function):
    """Saves what the plain op saves (x, y and the statistics), plus the whole batch's count."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        group: ProcessGroup | None,
        backend: str,
    ) -> Tensor:
        kernels = functional.kernels(backend)
        mean, var, count = _global_stats(kernels, x, group)
        if running_mean is not None and running_var is not None:
            reference_bn.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        y = kernels.forward(x, residual, weight, bias, mean, var, eps) if x.numel() else torch.empty_like(x)
        ctx.save_for_backward(x, y, weight, mean, var, count)
        ctx.kernels, ctx.eps, ctx.group = kernels, eps, group  # type: ignore[attr-defined]
        ctx.bias_dtype = None if bias is None else bias.dtype  # type: ignore[attr-defined]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, y, weight, mean, var, count = ctx.saved_tensors
        need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        if x.numel():
            _, dz, sum_dz_xhat, sum_dz = ctx.kernels.backward(
                dy, x, y, weight, mean, var, ctx.eps, True, False
            )
        else:
            dz, sum_dz_xhat = torch.empty_like(x), mean.new_zeros(mean.shape)
            sum_dz = torch.zeros_like(sum_dz_xhat)
        dx = None
        if need_x:
            # Every process needs x's gradient (its input always requires grad), so all reach this.
            sums = torch.stack([sum_dz, sum_dz_xhat])
            dist.all_reduce(sums, group=ctx.group)
            args = (dz, x, weight, mean, var, ctx.eps, sums[0], sums[1], count)
            dx = ctx.kernels.grad_input(*args) if x.numel() else torch.empty_like(x)
        return (
            dx,
            dz if need_residual else None,
            sum_dz_xhat.to(weight.dtype) if need_weight else None,
            sum_dz.to(ctx.bias_dtype) if need_bias else None,
            *([None] * 6),
        )


class SyncBatchNormAddReLU(BatchNormAddReLU):
    """`BatchNormAddReLU` whose training statistics are those of the batch of every process in
    `process_group` (None: the default group), as `nn.SyncBatchNorm`'s are. Made by
    `convert_sync_batchnorm`; same parameters, buffers and state_dict keys."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        process_group: ProcessGroup | None = None,
        backend: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group

    def _group(self) -> ProcessGroup | None:
        return dist.group.WORLD if self.process_group is None else self.process_group

    def _synchronised(self) -> bool:
        # As nn.SyncBatchNorm: only in training, and only with more than one process.
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self._group()) > 1

    def _apply_op(
        self,
        backend: str,
        x: Tensor,
        residual: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
    ) -> Tensor:
        if not self._synchronised():
            return super()._apply_op(backend, x, residual, running_mean, running_var, training, momentum)
        args = (x, residual, self.weight, self.bias, running_mean, running_var, momentum, self.eps)
        return _SyncBatchNormAddReLU.apply(*args, self._group(), backend)


def convert_sync_batchnorm(model: nn.Module, process_group: ProcessGroup | None = None) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` for fused models, in place.

    Every `BatchNormAddReLU` becomes a `SyncBatchNormAddReLU` sharing its tensors, and every other
    BatchNorm an `nn.SyncBatchNorm` (torch's converter), synchronised over `process_group` (None: the
    default group). Returns `model` (a new module when `model` is itself a BatchNorm). torch's own
    converter must not be used on a fused model: it would replace the fused modules by SyncBatchNorms,
    which take no residual and apply no ReLU.
    """
    if isinstance(model, BatchNormAddReLU):
        synced = SyncBatchNormAddReLU.from_batchnorm(model, model.backend)  # type: ignore[arg-type]
        synced.process_group = process_group
        return synced
    if isinstance(model, _BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for name, child in model.named_children():
        setattr(model, name, convert_sync_batchnorm(child, process_group))
    return model
