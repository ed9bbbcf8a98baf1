"""Per-tensor coefficients of the fused optimizer updates, shared by every fused backend.

Each function returns a float32 ``[n_tensors, K]`` tensor on the params' device; row i holds what
tensor i's update needs (lr, bias corrections, ...). The kernels (Triton, C++, CUDA) read their row,
so hyperparameters are data, never compile-time constants: a new lr never recompiles anything, a
tensor lr works like a float one, and since only device-side fills and copies build the table, no
step synchronises with the host and the whole step can be captured in a CUDA graph.

The columns and their order are each update's contract, declared in
:data:`resfast.kernels.optim_spec.SPECS`; every table here is built by name against it.

Host cost: built from torch ops, a table costs one launch per column and per arithmetic step (Adam's:
~15 on a GPU, each a few microseconds of host time). So the tables that depend on the step counts
(Adam's, Adagrad's) come from one native op when the extension runs on the params' device
(``torch.ops.resfast.adam_coef``/``adagrad_coef``: one launch; the same float64 formulas, checked
against these by tests/test_step_ops.py), and the tables that do not (SGD's, RMSprop's, LARS's) are kept
while their hyperparameters stay the same.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from resfast import backends
from resfast.kernels.optim_spec import ADAM_WEIGHT_DECAY, SPECS

__all__ = ["adagrad", "adam", "adam_weight_decay_mode", "lars", "rmsprop", "sgd"]


def _table(op: str, n: int, device: torch.device, values: dict[str, float | Tensor]) -> Tensor:
    """float32 [n, K] in the column order of SPECS[op]; each value a number, a 0-d tensor or an [n]
    tensor (per tensor)."""
    columns = SPECS[op].columns
    assert tuple(values) == columns, f"{op}: columns {tuple(values)} but the spec declares {columns}"
    coef = torch.empty(n, len(columns), dtype=torch.float32, device=device)
    for j, value in enumerate(values.values()):
        coef[:, j] = value
    return coef


# Tables of numbers alone, by (op, n, device, values): the kernels only read them, so one serves every
# step and optimizer that asks for the same. A few entries: an lr that changes every step replaces its
# table every step, as before.
_KEPT: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()
_KEEP = 16


def _kept_table(op: str, n: int, device: torch.device, values: dict[str, Any]) -> Tensor:
    """_table, reused when every value is a number (a tensor's value may change between steps)."""
    if (
        torch.compiler.is_compiling()
        or not all(isinstance(v, (int, float)) for v in values.values())
        # A table a CUDA graph captures must come from the graph's memory pool, which keeps it alive
        # as long as the graph: one kept here could be dropped (and its memory reused) before a replay.
        or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    ):
        return _table(op, n, device, values)
    key = (op, n, device, *values.values())
    table = _KEPT.get(key)
    if table is None:
        table = _KEPT[key] = _table(op, n, device, values)
        if len(_KEPT) > _KEEP:
            _KEPT.popitem(last=False)
    else:
        _KEPT.move_to_end(key)
    return table


def _native_ops(steps: Sequence[Tensor], device: torch.device, lr: float | Tensor, *numbers: Any) -> Any:
    """The native kernel module (resfast.kernels.cext) when its coefficient ops can build this table:
    the extension runs on `device`, the counters live there, lr is a number or a one-element
    float32/float64 tensor (there or on the CPU), and every other hyperparameter is a number. Else
    None: the torch ops below build it."""
    if not steps or torch.compiler.is_compiling() or not backends.native_runs(device.type):
        return None
    if steps[0].device != device or not all(isinstance(v, (int, float)) for v in numbers):
        return None
    if isinstance(lr, Tensor) and not (
        lr.numel() == 1 and lr.dtype in (torch.float32, torch.float64) and lr.device in (device, _CPU)
    ):
        return None
    return backends.kernel_module("optimizer", device.type)


_CPU = torch.device("cpu")


def _lr_args(lr: float | Tensor) -> tuple[Tensor | None, float]:
    """The native ops' (lr tensor, lr value) pair."""
    return (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))


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
    return _kept_table(
        "sgd", n, device, values | {"one_minus_dampening": 1 - dampening, "fresh": fresh_column}
    )


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
    return _kept_table("rmsprop", n, device, values | {"weight_decay": weight_decay, "momentum": momentum})


def lars(
    n: int,
    device: torch.device,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
) -> Tensor:
    # The trust ratios are not here: they depend on the norms of this step's tensors (see the kernels).
    values = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    return _kept_table("lars", n, device, values | {"trust_coefficient": trust_coefficient, "eps": eps})


def adagrad(
    steps: Sequence[Tensor],
    device: torch.device,
    *,
    lr: float | Tensor,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    kept: dict[str, Any] | None = None,
) -> Tensor:
    """`kept`: the store of the kept kernel call the counters belong to (resfast.kernels.cext._counters)."""
    native = _native_ops(steps, device, lr, lr_decay, weight_decay, eps)
    if native is not None:
        return native.adagrad_coef(steps, *_lr_args(lr), lr_decay, weight_decay, eps, kept=kept)
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
    kept: dict[str, Any] | None = None,
) -> Tensor:
    """`kept`: as adagrad's."""
    wd_mode = adam_weight_decay_mode(weight_decay, decoupled)
    native = _native_ops(steps, device, lr, beta1, beta2, eps, weight_decay)
    if native is not None:
        return native.adam_coef(steps, *_lr_args(lr), beta1, beta2, eps, weight_decay, wd_mode, kept=kept)
    step = _step_counts(steps, device)
    decoupled_decay = wd_mode == ADAM_WEIGHT_DECAY["decoupled"]
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
