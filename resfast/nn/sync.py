"""`SyncBatchNormAddReLU`: the fused op with nn.SyncBatchNorm's semantics across processes.

In training, each process reduces its batch to per-channel (mean, biased variance, count), the
processes all-gather these, and every process combines them into the statistics of the whole
distributed batch (Chan et al.'s parallel formula: no sum-of-squares cancellation), which normalise x
and update the running stats. Backward all-reduces the per-channel sums of dz and dz * xhat, so dx is
the whole batch's; dweight and dbias stay this process's sums, which DDP averages like any other
gradient (as nn.SyncBatchNorm leaves them). Eval mode, and a single process, use the plain op.

The synchronised path is an autograd.Function that calls collectives: it runs eagerly (a model using it
is not meant for torch.compile with fullgraph=True).

torch's own converter, `nn.SyncBatchNorm.convert_sync_batchnorm` (what torchvision's reference training
script runs for ``--sync-bn``), treats a `BatchNormAddReLU` as any `_BatchNorm`: it builds a plain
`nn.SyncBatchNorm` over the same tensors and registers it on the parent under the same name. That
module takes no residual and applies no ReLU, so a fused block's ``bn2(x, shortcut)`` would raise, and
``relu(bn(x))`` layers, the fused stem's among them, would silently lose their ReLU. Importing this
module therefore registers a global module-registration hook (`_keep_fused`): a plain
`nn.SyncBatchNorm` registered in place of a `BatchNormAddReLU`, by any parent and by ``add_module`` or
attribute assignment alike, becomes a `SyncBatchNormAddReLU` over the same tensors. The hook is
global because the stem's parent is the model itself (a torchvision `ResNet`, which resfast does not
own), and so that `BatchNormAddReLU`s in users' own containers are kept fused too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_module_registration_hook

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

    @classmethod
    def from_batchnorm(
        cls, bn: _BatchNorm, backend: str = "auto", *, process_group: ProcessGroup | None = None
    ) -> SyncBatchNormAddReLU:
        """`BatchNormAddReLU.from_batchnorm`, synchronised over `process_group` (None: the default
        group); a `qconfig` on bn is carried over, as torch's converter carries it."""
        synced = super().from_batchnorm(bn, backend)
        synced.process_group = process_group
        if hasattr(bn, "qconfig"):
            synced.qconfig = bn.qconfig
        return synced

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
    BatchNorm an `nn.SyncBatchNorm`, synchronised over `process_group` (None: the default group).
    Returns `model` (a new module when `model` is itself a BatchNorm). Inside a model this is what
    torch's converter does too, through `_keep_fused`; only a `BatchNormAddReLU` passed as `model`
    itself, which has no parent to register it, needs this function.
    """
    if isinstance(model, BatchNormAddReLU):
        return SyncBatchNormAddReLU.from_batchnorm(model, model.backend, process_group=process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def _keep_fused(parent: nn.Module, name: str, module: nn.Module | None) -> nn.Module | None:
    """Module-registration hook: `module`, about to be registered as `parent.<name>`, as a
    `SyncBatchNormAddReLU` if it is a plain `nn.SyncBatchNorm` replacing a `BatchNormAddReLU`; None
    (register `module` unchanged) otherwise.

    torch's converter has copied the fused module's tensors (so requires_grad too), eps, momentum,
    training mode and qconfig into the SyncBatchNorm, and set its process group; the backend, which
    it does not know, is the replaced module's. Subclasses of nn.SyncBatchNorm are left alone: their
    forward may be their own."""
    if type(module) is not nn.SyncBatchNorm:  # first: the hook sees every registration in the process
        return None
    replaced = parent._modules.get(name)
    if not isinstance(replaced, BatchNormAddReLU):
        return None
    return SyncBatchNormAddReLU.from_batchnorm(module, replaced.backend, process_group=module.process_group)


# Kept so that the hook could be removed; registered once, when resfast.nn is first imported.
_KEEP_FUSED_HOOK = register_module_module_registration_hook(_keep_fused)
