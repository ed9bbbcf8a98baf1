"""Adam and AdamW (amsgrad, maximize, decoupled weight decay); torch.optim's interfaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from resfast.kernels.optim_spec import SPECS
from resfast.optim._base import Batch, FusedStep, reject_differentiable


class _AdamStep(FusedStep):
    _spec = SPECS["adam"]
    _sparse_grad_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _new_state(self, group: dict[str, Any], p: Tensor, key: str) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(
        self, fn: Callable[..., None], group: dict[str, Any], b: Batch, extra: dict[str, Any]
    ) -> None:
        beta1, beta2 = group["betas"]
        fn(
            b.params, b.grads, b.states["exp_avg"], b.states["exp_avg_sq"], b.optional("max_exp_avg_sq"),
            b.steps,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"],
            decoupled_weight_decay=group.get("decoupled_weight_decay", isinstance(self, AdamW)), **extra,
        )  # fmt: skip


class Adam(_AdamStep, torch.optim.Adam):
    """Drop-in for :class:`torch.optim.Adam` whose update runs as one fused kernel per bucket.

    Arguments, defaults, errors and state (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) are torch's; ``capturable`` is honoured. See :class:`resfast.optim.SGD` for
    ``foreach``/``fused``/``backend``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        master_weights: bool = False,
        bf16_stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        reject_differentiable(differentiable)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        self._init_backend(backend, master_weights, bf16_stochastic_rounding, max_grad_norm)


class AdamW(_AdamStep, torch.optim.AdamW):
    """Drop-in for :class:`torch.optim.AdamW` (decoupled weight decay, default 1e-2); see :class:`Adam`."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        master_weights: bool = False,
        bf16_stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        reject_differentiable(differentiable)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
            fused=fused,
        )  # fmt: skip
        self._init_backend(backend, master_weights, bf16_stochastic_rounding, max_grad_norm)
