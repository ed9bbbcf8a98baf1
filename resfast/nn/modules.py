"""`BatchNormAddReLU`: a BatchNorm2d whose forward also adds a residual and applies ReLU."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from resfast import backends
from resfast.nn.functional import apply_checked, check_inputs, check_rank, select_backend

__all__ = ["BatchNormAddReLU"]

_Fused = TypeVar("_Fused", bound="BatchNormAddReLU")


class BatchNormAddReLU(_BatchNorm):
    """``relu(bn(x) + residual)`` (``relu(bn(x))`` when residual is None) in one fused op.

    Parameters, buffers, state_dict keys, factory kwargs and the training/eval semantics are those of
    `nn.BatchNorm2d` (with `nn.BatchNorm1d`'s 2-D and 3-D inputs accepted too), so checkpoints load in
    both directions. It subclasses `_BatchNorm`, BatchNorm's common base, rather than `nn.BatchNorm2d`:
    that gives the parameters, buffers, `reset_running_stats`, `extra_repr` and the loading of old
    checkpoints without num_batches_tracked, and code that looks for "a BatchNorm" (e.g. to exclude
    it from weight decay) still finds it; but code that rewrites `nn.BatchNorm2d` specifically, such
    as conv-bn folding, does not mistake it for a plain BatchNorm and silently drop the add and ReLU.
    (`nn.SyncBatchNorm.convert_sync_batchnorm` does convert `_BatchNorm`s, into plain SyncBatchNorms
    that take no residual and apply no ReLU; importing `resfast.nn` makes each of those that replaces
    a `BatchNormAddReLU` a `SyncBatchNormAddReLU` instead: see `resfast.nn.sync`.)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        backend: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.backend = backends.validate(backend)

    @classmethod
    def from_batchnorm(cls: type[_Fused], bn: _BatchNorm, backend: str = "auto") -> _Fused:
        """A fused module sharing bn's parameter and buffer tensors (so an optimizer built over the
        original model keeps updating them, and their requires_grad is kept) and its hyperparameters
        and training mode."""
        fused = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            backend=backend,
            device="meta",
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(fused, name, getattr(bn, name))
        return fused.train(bn.training)

    def _check_input_dim(self, input: Tensor) -> None:
        check_rank(input)

    def _momentum(self) -> float:
        """This batch's weight in the running averages; counts the batch, as nn.BatchNorm2d does."""
        if not (self.training and self.track_running_stats and self.num_batches_tracked is not None):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        # Batch statistics in training, and in eval when there are no running stats.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Running stats are updated only when tracked, and read whenever they exist in eval.
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        check_inputs(x, residual, running_mean, running_var, self.weight, self.bias, bn_training, self.eps)
        backend = select_backend(x, self.backend)
        return self._apply_op(backend, x, residual, running_mean, running_var, bn_training, self._momentum())

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
        """The op on checked inputs (`SyncBatchNormAddReLU` synchronises its statistics here)."""
        args = (x, residual, running_mean, running_var, self.weight, self.bias, training, momentum, self.eps)
        return apply_checked(backend, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
