"""LARS (layer-wise adaptive rate scaling) for large-batch training, with the MLPerf ResNet rule; and the
param groups that rule uses.

torch.optim has no LARS, so this class is written on :class:`torch.optim.Optimizer` directly, in the
shape of resfast's SGD: construction validates every group before anything exists, and the step is
resfast's fused one (:class:`~resfast.optim._base.FusedStep`). The update (its maths:
:func:`resfast.kernels.reference_optim.lars`) needs each tensor's norms before any of its elements
changes: the fused backends reduce them in a first pass over the whole bucket and update in a second
(on a GPU, two launches per bucket with no host sync; the Triton and CUDA kernels alike), in a fixed
order, so a step repeats bit for bit. ``auto`` picks as for the other optimizers: the CUDA kernels on a
GPU, the C++ ones on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.optimizer import ParamsT

from resfast import backends
from resfast.kernels.optim_spec import SPECS
from resfast.optim._base import Batch, FusedStep

__all__ = ["LARS", "lars_param_groups"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LARS's {name} must be a real number, got {type(value).__name__} {value!r}")
    return value


def _check_group(group: dict[str, Any]) -> None:
    """ValueError/TypeError for a param group's invalid hyperparameters (torch SGD's checks, and LARS's
    own), naming the value and what is allowed."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        lr_value = float(lr.detach().reshape(()).item())  # construction only: a host sync is fine here
    else:
        lr_value = _number("lr", lr)
    checks = {
        "lr": (lr_value, lr_value >= 0, ">= 0"),
        "momentum": (v := _number("momentum", group["momentum"]), v >= 0, ">= 0"),
        "weight_decay": (v := _number("weight_decay", group["weight_decay"]), v >= 0, ">= 0"),
        # 0 would silently freeze every adapted tensor (its trust ratio would be 0).
        "trust_coefficient": (v := _number("trust_coefficient", group["trust_coefficient"]), v > 0, "> 0"),
        "eps": (v := _number("eps", group["eps"]), v >= 0, ">= 0"),
    }
    for name, (value, ok, allowed) in checks.items():
        if not ok or math.isinf(value):  # `not ok` also catches NaN
            raise ValueError(f"Invalid {name} value: {value} (LARS needs a finite value {allowed})")
    for flag in ("nesterov", "maximize", "lars_adaptation"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"LARS's {flag} must be a bool, got {type(group[flag]).__name__} {group[flag]!r}")
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError("Nesterov momentum requires a momentum > 0")


class LARS(FusedStep, torch.optim.Optimizer):
    """LARS with the learning rate inside the momentum buffer (the MLPerf ResNet rule).

    Per tensor and step, with ``w`` the param, ``g`` its grad and ``v`` its ``momentum_buffer``
    (zeros before the first step)::

        d     = g + weight_decay * w
        trust = trust_coefficient * ‖w‖ / (‖g‖ + weight_decay * ‖w‖ + eps)
                    if lars_adaptation and ‖w‖ > 0 and ‖g‖ > 0, else 1
        v     = momentum * v + lr * trust * d
        w     = w - (momentum * v + lr * trust * d  if nesterov  else  v)

    ``lars_adaptation`` is a param-group key (default True); :func:`lars_param_groups` builds the usual
    groups. ``maximize`` negates the grad first. GradScaler's scale is removed before the norms are
    taken, and a step it skips changes no param or buffer. ``backend``: as for resfast's other
    optimizers (``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``). On a GPU the step never
    synchronises with the host (Triton and CUDA backends). ``max_grad_norm``: clipping inside the step,
    as for :class:`resfast.optim.SGD` (the trust ratio sees the clipped grad's norm).
    """

    _spec = SPECS["lars"]
    _sparse_grad_error = "LARS does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "maximize": maximize,
            "lars_adaptation": True,
        }
        _check_group(defaults)
        backends.validate(backend)  # with the hyperparameters: before torch builds any group
        super().__init__(params, defaults)
        self._init_backend(backend, max_grad_norm=max_grad_norm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Every group is checked with the defaults it will inherit, before torch adds it.
        _check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def _new_state(self, group: dict[str, Any], p: Tensor, key: str) -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(
        self, fn: Callable[..., None], group: dict[str, Any], b: Batch, extra: dict[str, Any]
    ) -> None:
        fn(
            b.params, b.grads, b.states["momentum_buffer"],
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"], eps=group["eps"],
            lars_adaptation=group["lars_adaptation"], nesterov=group["nesterov"], maximize=group["maximize"],
            **extra,
        )  # fmt: skip


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The MLPerf ResNet param groups for :class:`LARS`: every weight except BatchNorm's (convolutions,
    linear layers) adapted and decayed by `weight_decay`; BatchNorm weights and biases (nn.BatchNorm*
    and resfast's BatchNormAddReLU alike) and every bias neither adapted nor decayed. A param shared
    by several modules is listed once; an empty group is left out."""
    _number("weight_decay", weight_decay)
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (needs >= 0)")
    adapted: list[Tensor] = []
    plain: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        # _NormBase: every torch BatchNorm (and InstanceNorm), and BatchNormAddReLU, which subclasses it.
        is_norm = isinstance(module, _NormBase)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            (plain if is_norm or name == "bias" else adapted).append(p)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "lars_adaptation": True},
        {"params": plain, "weight_decay": 0.0, "lars_adaptation": False},
    ]
    return [g for g in groups if g["params"]]
