"""Adagrad (lr_decay, initial_accumulator_value); torch.optim.Adagrad's interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from resfast.kernels.optim_spec import SPECS
from resfast.optim._base import Batch, FusedStep, reject_differentiable


class Adagrad(FusedStep, torch.optim.Adagrad):
    """Drop-in for :class:`torch.optim.Adagrad` whose update runs as one fused kernel per bucket.

    Arguments, defaults, errors and state (``step``, ``sum``) are torch's. Sparse gradients are
    supported, as in torch, and run on the reference backend. See :class:`resfast.optim.SGD` for
    ``foreach``/``fused``/``backend``.
    """

    _spec = SPECS["adagrad"]

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        bf16_stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        reject_differentiable(differentiable)
        super().__init__(
            params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._init_backend(backend, master_weights, bf16_stochastic_rounding, max_grad_norm)

    def _new_state(self, group: dict[str, Any], p: Tensor, key: str) -> Tensor:
        # torch reads the accumulator's start from the constructor's defaults, not the group.
        init = self.defaults["initial_accumulator_value"]
        value = complex(init, init) if p.is_complex() else init
        return torch.full_like(p, value, memory_format=torch.preserve_format)

    def _update(
        self, fn: Callable[..., None], group: dict[str, Any], b: Batch, extra: dict[str, Any]
    ) -> None:
        fn(
            b.params, b.grads, b.states["sum"], b.steps,
            lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"], **extra,
        )  # fmt: skip
