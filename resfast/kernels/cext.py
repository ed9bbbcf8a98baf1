"""The native backends (``cpu``: C++, ``cuda``: CUDA C++) of the optimizer updates.

Thin wrappers over the ops that ``resfast._C`` registers as ``torch.ops.resfast.*`` (sources in
``csrc/``): same signatures and semantics as :mod:`resfast.kernels.reference_optim`, the same
per-tensor coefficient tables as the Triton backend (:mod:`resfast.kernels.optim_coef`). Importing
this module loads the extension; ``resfast.backends`` only routes here when it loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

import resfast._C  # noqa: F401  (registers torch.ops.resfast.*)
from resfast.kernels import optim_coef

__all__ = ["adagrad", "adam", "count_steps", "rmsprop", "sgd"]

_ops = torch.ops.resfast


def _register_fakes() -> None:
    """Fake (meta) implementations: the ops only mutate their inputs, so tracing needs nothing else."""
    for name in ("sgd_", "rmsprop_", "adagrad_", "adam_", "count_steps_"):
        torch.library.register_fake(f"resfast::{name}")(lambda *args, **kwargs: None)


_register_fakes()


def count_steps(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """steps[i] += 1 for every one-element CPU step counter, unless found_inf (one element) is nonzero."""
    _ops.count_steps_(steps, found_inf)


def _no_low_precision_params(master_params: list[Tensor] | None, stochastic_seed: int | None) -> None:
    # The optimizers never route these here (resfast.backends.choose is told the native kernels lack
    # them); a direct caller gets told too rather than a silently plain update.
    if master_params is not None or stochastic_seed is not None:
        raise NotImplementedError(
            "the native kernels have no master-weight or stochastic-rounding update yet; use the triton or "
            "reference backend"
        )


def _present(tensors: list[Tensor | None], used: bool) -> list[Tensor]:
    """An optional state list as the ops take it: the tensors when the option is on, else empty."""
    return [t for t in tensors if t is not None] if used else []


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    fresh: list[bool],
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    _no_low_precision_params(master_params, stochastic_seed)
    coef = optim_coef.sgd(
        len(params), params[0].device, lr=lr, weight_decay=weight_decay, momentum=momentum,
        dampening=dampening, fresh=fresh,
    )  # fmt: skip
    _ops.sgd_(
        params, grads, _present(momentum_buffers, momentum != 0), coef, grad_scale, found_inf,
        bool(weight_decay != 0), nesterov, maximize,
    )  # fmt: skip


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    _no_low_precision_params(master_params, stochastic_seed)
    coef = optim_coef.rmsprop(
        len(params),
        params[0].device,
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
    )
    _ops.rmsprop_(
        params, grads, square_avgs, _present(grad_avgs, centered), _present(momentum_buffers, momentum > 0),
        coef, grad_scale, found_inf, weight_decay != 0, maximize,
    )  # fmt: skip


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    _no_low_precision_params(master_params, stochastic_seed)
    coef = optim_coef.adagrad(
        steps, params[0].device, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps
    )
    _ops.adagrad_(params, grads, state_sums, coef, grad_scale, found_inf, weight_decay != 0, maximize)


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: list[Tensor] | None = None,
    stochastic_seed: int | None = None,
) -> None:
    _no_low_precision_params(master_params, stochastic_seed)
    coef = optim_coef.adam(
        steps, params[0].device, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
    )  # fmt: skip
    _ops.adam_(
        params, grads, exp_avgs, exp_avg_sqs, _present(max_exp_avg_sqs, amsgrad), coef, grad_scale, found_inf,
        optim_coef.adam_weight_decay_mode(weight_decay, decoupled_weight_decay), maximize,
    )  # fmt: skip
