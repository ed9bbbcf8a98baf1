"""SGD with momentum, dampening, Nesterov, weight decay and maximize; torch.optim.SGD's interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from resfast.kernels.optim_spec import SPECS
from resfast.optim._base import Batch, FusedStep, reject_differentiable


class SGD(FusedStep, torch.optim.SGD):
    """Drop-in for :class:`torch.optim.SGD` whose update runs as one fused kernel per bucket.

    Arguments, defaults, errors and state (``momentum_buffer``) are torch's. ``foreach`` and ``fused``
    are accepted and recorded as torch records them (resfast always fuses). ``backend`` picks the
    kernels: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    ``max_grad_norm`` (every resfast optimizer has it): clip inside the step, the same update as
    ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` then ``step()``, without writing the grads
    or a host sync. The norm is over all groups' grads (unscaled under GradScaler); ``grad_norm`` holds
    the last step's, a device tensor.
    """

    _spec = SPECS["sgd"]

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        bf16_stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        reject_differentiable(differentiable)
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._init_backend(backend, master_weights, bf16_stochastic_rounding, max_grad_norm)

    def _new_state(self, group: dict[str, Any], p: Tensor, key: str) -> Tensor:
        # Filled with the first gradient by the kernel (the `fresh` flag), as torch clones it: so a
        # sparse gradient starts a sparse buffer, as in torch.
        if p.grad is not None and p.grad.is_sparse:
            return torch.zeros_like(p.grad)
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(
        self, fn: Callable[..., None], group: dict[str, Any], b: Batch, extra: dict[str, Any]
    ) -> None:
        found_inf = extra["found_inf"]
        if any(b.fresh) and found_inf is not None and found_inf.item():
            # A skipped first step must leave no buffer behind, so the next one starts from the grad
            # as torch's does. This host sync happens only on a buffer's first step.
            for p, new in zip(b.owners, b.fresh, strict=True):
                if new:
                    del self.state[p]["momentum_buffer"]
            return
        fn(
            b.params, b.grads, b.optional("momentum_buffer"), b.fresh,
            lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"], **extra,
        )  # fmt: skip
