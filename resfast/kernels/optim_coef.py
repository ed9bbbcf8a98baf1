"""Per-tensor coefficients of the fused optimizer updates, shared by every fused backend.

Each function returns a float32 ``[n_tensors, K]`` tensor on the params' device; row i holds what
tensor i's update needs (lr, bias corrections, ...). The kernels (Triton, C++, CUDA) read their row,
so hyperparameters are data, never compile-time constants: a new lr never recompiles anything, a
tensor lr works like a float one, and since only device-side fills and copies build the table, no
step synchronises with the host and the whole step can be captured in a CUDA graph.

The columns and their order are each update's contract, declared in
:data:`resfast.kernels.optim_spec.SPECS`; every table here is built by name against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from resfast.kernels.optim_spec import ADAM_WEIGHT_DECAY, SPECS

__all__ = ["adagrad", "adam", "adam_weight_decay_mode", "rmsprop", "sgd"]


def _table(op: str, n: int, device: torch.device, values: dict[str, float | Tensor]) -> Tensor:
    """float32 [n, K] in the column order of SPECS[op]; each value a number, a 0-d tensor or an [n]
    tensor (per tensor)."""
    columns = SPECS[op].columns
    assert tuple(values) == columns, f"{op}: columns {tuple(values)} but the spec declares {columns}"
    coef = torch.empty(n, len(columns), dtype=torch.float32, device=device)
    for j, value in enumerate(values.values()):
        coef[:, j] = value
    return coef


def _step_counts(steps: Sequence[Tensor], device: torch.device) -> Tensor:
    """The per-tensor step counts as one float64 vector (bias corrections are computed in fp64)."""
    return torch.stack(list(steps)).to(device=device, dtype=torch.float64)


def sgd(
    n: int,
    device: torch.device,
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    momentum: float,
    dampening: float,
    fresh: Sequence[bool],
) -> Tensor:
    # The fresh flags change only on a buffer's first step; 0.0 fills without a host-to-device copy.
    fresh_column = torch.tensor(fresh, dtype=torch.float32) if any(fresh) else 0.0
    values = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
    return _table("sgd", n, device, values | {"one_minus_dampening": 1 - dampening, "fresh": fresh_column})


def rmsprop(
    n: int,
    device: torch.device,
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
) -> Tensor:
    values = {"lr": lr, "alpha": alpha, "one_minus_alpha": 1 - alpha, "eps": eps}
    return _table("rmsprop", n, device, values | {"weight_decay": weight_decay, "momentum": momentum})


def adagrad(
    steps: Sequence[Tensor],
    device: torch.device,
    *,
    lr: float | Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
) -> Tensor:
    clr = lr / (1 + (_step_counts(steps, device) - 1) * lr_decay)
    return _table("adagrad", len(steps), device, {"clr": clr, "weight_decay": weight_decay, "eps": eps})


def adam_weight_decay_mode(weight_decay: float, decoupled: bool) -> int:
    """ADAM_WEIGHT_DECAY's none; l2: added to the grad (Adam); decoupled: param *= 1 - lr * wd (AdamW)."""
    return ADAM_WEIGHT_DECAY["none" if weight_decay == 0 else "decoupled" if decoupled else "l2"]


def adam(
    steps: Sequence[Tensor],
    device: torch.device,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> Tensor:
    step = _step_counts(steps, device)
    decoupled_decay = adam_weight_decay_mode(weight_decay, decoupled) == ADAM_WEIGHT_DECAY["decoupled"]
    values = {
        "step_size": lr / (1 - beta1**step),
        "sqrt_bias_correction2": (1 - beta2**step).sqrt(),
        "one_minus_beta1": 1 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1 - beta2,
        "eps": eps,
        "weight_decay_term": 1 - lr * weight_decay if decoupled_decay else weight_decay,
    }
    return _table("adam", len(steps), device, values)
