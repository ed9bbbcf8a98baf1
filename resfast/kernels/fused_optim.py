"""The fused backends' front door: the updates, with the signatures of
:mod:`resfast.kernels.reference_optim` (the specification), written once for every fused backend.

Each function builds its update's coefficient table (:mod:`resfast.kernels.optim_coef`), its state
lists in the spec's order (absent ones as None) and its flags (the spec's ``options``), and hands
them to the backend's `launch` as a :class:`FusedCall`; a backend provides nothing else.
:class:`FusedUpdates` binds them to one `launch`: ``triton_optim`` and ``cext`` expose theirs as
module functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from resfast.kernels import optim_coef
from resfast.kernels.optim_spec import SPECS, OptimizerSpec

__all__ = ["FusedCall", "FusedUpdates", "Launch"]


@dataclass
class FusedCall:
    """One fused update of every tensor, as a backend's `launch` receives it."""

    spec: OptimizerSpec
    params: list[Tensor]
    # None only for a kept call whose native update has read this step's grads itself (its `kept` store
    # holds that update: resfast/optim/_step_cache.py)
    grads: list[Tensor] | None
    states: list[list[Tensor] | None]  # in spec.states order; None: the option that makes it is off
    coef: Tensor  # the coefficient table, columns spec.columns
    options: dict[str, Any]  # the kernel flags, keyed by spec.options
    grad_scale: Tensor | None = None  # GradScaler's: unscale in the kernel, skip on found_inf != 0
    found_inf: Tensor | None = None
    # max_grad_norm's clip factor (fp32 [1], on the params' device): multiplies every unscaled grad
    grad_clip: Tensor | None = None
    master_params: list[Tensor] | None = None  # low-precision modes (see the README)
    stochastic_seed: int | None = None
    # A kept kernel call's own store, the same dict at every step that reuses the call (see
    # resfast/optim/_step_cache.py): a backend may keep what it prepared for these tensors there.
    kept: dict[str, Any] | None = None


# What a fused backend provides: run a FusedCall.
Launch = Callable[[FusedCall], None]


class FusedUpdates:
    """sgd, rmsprop, adagrad, adam and lars for one backend's `launch` (a backend exposes those it
    implements: resfast.backends routes the others elsewhere)."""

    def __init__(self, launch: Launch) -> None:
        self._launch = launch

    def _run(
        self,
        op: str,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[list[Tensor] | None],
        coef: Tensor,
        options: dict[str, Any],
        extra: dict[str, Any],
    ) -> None:
        spec = SPECS[op]
        assert tuple(options) == spec.options and len(states) == len(spec.states), op
        self._launch(FusedCall(spec, params, grads, states, coef, options, **extra))

    def sgd(
        self,
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
        **extra: Any,
    ) -> None:
        coef = optim_coef.sgd(
            len(params), params[0].device, lr=lr, weight_decay=weight_decay, momentum=momentum,
            dampening=dampening, fresh=fresh,
        )  # fmt: skip
        states = [momentum_buffers if momentum != 0 else None]
        options = {"has_wd": bool(weight_decay != 0), "nesterov": nesterov, "maximize": maximize}
        self._run("sgd", params, grads, states, coef, options, extra)

    def rmsprop(
        self,
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
        **extra: Any,
    ) -> None:
        coef = optim_coef.rmsprop(
            len(params), params[0].device, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
            momentum=momentum,
        )  # fmt: skip
        states = [square_avgs, grad_avgs if centered else None, momentum_buffers if momentum > 0 else None]
        options = {"has_wd": weight_decay != 0, "maximize": maximize}
        self._run("rmsprop", params, grads, states, coef, options, extra)

    def adagrad(
        self,
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
        **extra: Any,
    ) -> None:
        coef = optim_coef.adagrad(
            steps, params[0].device, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
            kept=extra.get("kept"),
        )  # fmt: skip
        options = {"has_wd": weight_decay != 0, "maximize": maximize}
        self._run("adagrad", params, grads, [state_sums], coef, options, extra)

    def adam(
        self,
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
        **extra: Any,
    ) -> None:
        coef = optim_coef.adam(
            steps, params[0].device, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled=decoupled_weight_decay, kept=extra.get("kept"),
        )  # fmt: skip
        states = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None]
        wd_mode = optim_coef.adam_weight_decay_mode(weight_decay, decoupled_weight_decay)
        self._run("adam", params, grads, states, coef, {"wd_mode": wd_mode, "maximize": maximize}, extra)

    def lars(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor],
        *,
        lr: float | Tensor,
        momentum: float,
        weight_decay: float,
        trust_coefficient: float,
        eps: float,
        lars_adaptation: bool,
        nesterov: bool,
        maximize: bool,
        **extra: Any,
    ) -> None:
        coef = optim_coef.lars(
            len(params), params[0].device, lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, eps=eps,
        )  # fmt: skip
        options = {
            "has_wd": weight_decay != 0,
            "lars_adaptation": bool(lars_adaptation),
            "nesterov": bool(nesterov),
            "maximize": bool(maximize),
        }
        self._run("lars", params, grads, [momentum_buffers], coef, options, extra)
