"""Per-tensor coefficients of the fused optimizer updates, shared by every fused backend.

Each function returns a float32 ``[n_tensors, K]`` tensor on the params' device; row i holds what
tensor i's update needs (lr, bias corrections, ...). The kernels (Triton, C++, CUDA) read their row,
so hyperparameters are data, never compile-time constants: a new lr never recompiles anything, a
tensor lr works like a float one, and since only device-side fills and copies build the table, no
step synchronises with the host and the whole step can be captured in a CUDA graph.

The column order is part of each kernel's contract and is listed in each docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adagrad", "adam", "rmsprop", "sgd"]


def _table(n: int, device: torch.device, columns: Sequence[float | Tensor]) -> Tensor:
    """float32 [n, len(columns)]; each column a number, a 0-d tensor or an [n] tensor (per tensor)."""
    coef = torch.empty(n, len(columns), dtype=torch.float32, device=device)
    for j, value in enumerate(columns):
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
    """Columns: lr, weight_decay, momentum, 1 - dampening, fresh (1.0: the buffer starts as the grad)."""
    # The fresh flags change only on a buffer's first step; 0.0 fills without a host-to-device copy.
    fresh_column = torch.tensor(fresh, dtype=torch.float32) if any(fresh) else 0.0
    return _table(n, device, [lr, weight_decay, momentum, 1 - dampening, fresh_column])


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
    """Columns: lr, alpha, 1 - alpha, eps, weight_decay, momentum."""
    return _table(n, device, [lr, alpha, 1 - alpha, eps, weight_decay, momentum])


def adagrad(
    steps: Sequence[Tensor],
    device: torch.device,
    *,
    lr: float | Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
) -> Tensor:
    """Columns: clr = lr / (1 + (step - 1) * lr_decay), weight_decay, eps."""
    clr = lr / (1 + (_step_counts(steps, device) - 1) * lr_decay)
    return _table(len(steps), device, [clr, weight_decay, eps])


def adam_weight_decay_mode(weight_decay: float, decoupled: bool) -> int:
    """0: none; 1: added to the grad (Adam); 2: decoupled, param *= 1 - lr * wd (AdamW)."""
    return 0 if weight_decay == 0 else 2 if decoupled else 1


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
    """Columns: step_size = lr / (1 - beta1^step), sqrt(1 - beta2^step), 1 - beta1, beta2, 1 - beta2,
    eps, then weight_decay (mode 1) or 1 - lr * weight_decay (mode 2; see adam_weight_decay_mode)."""
    step = _step_counts(steps, device)
    decay = 1 - lr * weight_decay if adam_weight_decay_mode(weight_decay, decoupled) == 2 else weight_decay
    columns = [lr / (1 - beta1**step), (1 - beta2**step).sqrt(), 1 - beta1, beta2, 1 - beta2, eps, decay]
    return _table(len(steps), device, columns)
