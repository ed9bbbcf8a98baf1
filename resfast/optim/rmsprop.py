"""RMSprop (centered, momentum); torch.optim.RMSprop's interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from resfast.kernels.optim_spec import SPECS
from resfast.optim._base import Batch, FusedStep, reject_differentiable


class RMSprop(FusedStep, torch.optim.RMSprop):
    """Drop-in for :class:`torch.optim.RMSprop` whose update runs as one fused kernel per bucket.

    Arguments, defaults, errors and state (``step``, ``square_avg``, ``momentum_buffer``,
    ``grad_avg``) are torch's; ``capturable`` is honoured. See :class:`resfast.optim.SGD` for
    ``foreach``/``fused``/``backend``.
    """

    _spec = SPECS["rmsprop"]
    _sparse_grad_error = "RMSprop does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str = "auto",
        master_weights: bool = False,
        bf16_stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        reject_differentiable(differentiable)
        super().__init__(
            params, lr, alpha, eps, weight_decay, momentum, centered, capturable, foreach, maximize,
            differentiable,
        )  # fmt: skip
        self._init_backend(backend, master_weights, bf16_stochastic_rounding, max_grad_norm)

    def _new_state(self, group: dict[str, Any], p: Tensor, key: str) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(
        self, fn: Callable[..., None], group: dict[str, Any], b: Batch, extra: dict[str, Any]
    ) -> None:
        fn(
            b.params, b.grads, b.states["square_avg"], b.optional("grad_avg"), b.optional("momentum_buffer"),
            b.steps,
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
            momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"], **extra,
        )  # fmt: skip
