"""The native backends (``cpu``: C++, ``cuda``: CUDA C++) of the optimizer updates.

The ops that ``resfast._C`` registers as ``torch.ops.resfast.*`` (sources in ``csrc/``) behind the
fused backends' front door (:mod:`resfast.kernels.fused_optim`): same signatures and semantics as
:mod:`resfast.kernels.reference_optim`, the same coefficient tables as the Triton backend. Importing
this module loads the extension; ``resfast.backends`` only routes here when it loaded.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

import resfast._C  # registers torch.ops.resfast.*
from resfast.kernels.fused_optim import FusedCall, FusedUpdates
from resfast.kernels.optim_spec import SPECS

__all__ = [
    "adagrad", "adagrad_coef", "adam", "adam_coef", "count_steps", "grads_norm", "lars", "launch", "ops",
    "rmsprop", "sgd", "total_norm",
]  # fmt: skip

ops = _ops = torch.ops.resfast


def _register_fakes() -> None:
    """Fake (meta) implementations: the update ops only mutate their inputs, so tracing needs nothing
    else; the coefficient ops return a new [len(steps), columns] float32 table on the counters' device."""
    for name in ("sgd_", "rmsprop_", "adagrad_", "adam_", "lars_", "count_steps_"):
        torch.library.register_fake(f"resfast::{name}")(lambda *args, **kwargs: None)
    for name, op in (("adam_coef", "adam"), ("adagrad_coef", "adagrad")):
        columns = len(SPECS[op].columns)
        torch.library.register_fake(f"resfast::{name}")(
            lambda steps, *args, columns=columns: torch.empty(
                len(steps), columns, dtype=torch.float32, device=steps[0].device if steps else "cpu"
            )
        )

    @torch.library.register_fake("resfast::total_norm")
    def _(tensors: list[Tensor]) -> Tensor:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        return torch.empty((), dtype=dtype, device=tensors[0].device)


_register_fakes()


def count_steps(steps: list[Tensor], found_inf: Tensor | None, kept: dict[str, Any] | None = None) -> None:
    """steps[i] += 1 for every one-element step counter (CPU: a loop; CUDA: one launch), unless
    found_inf (one element, on the counters' device; a CPU one on the CPU) is nonzero. `kept`: the
    store of the kept kernel call these counters belong to (see _counters)."""
    if kept is None:
        _ops.count_steps_(steps, found_inf)
    else:
        _counters(steps, kept).count_(found_inf)


def adam_coef(steps: list[Tensor], *args: Any, kept: dict[str, Any] | None = None) -> Tensor:
    """torch.ops.resfast.adam_coef(steps, *args), with a kept call's counters held natively (_counters)."""
    return _ops.adam_coef(steps, *args) if kept is None else _counters(steps, kept).adam_coef(*args)


def adagrad_coef(steps: list[Tensor], *args: Any, kept: dict[str, Any] | None = None) -> Tensor:
    """torch.ops.resfast.adagrad_coef(steps, *args), with a kept call's counters held natively."""
    return _ops.adagrad_coef(steps, *args) if kept is None else _counters(steps, kept).adagrad_coef(*args)


def _counters(steps: list[Tensor], kept: dict[str, Any]) -> resfast._C.StepCounters:
    """A kept kernel call's step counters as a native list, made at its first step and kept in its store:
    an op over them then converts no list from Python (~3-5 us per op for 161 counters). The step cache
    reuses a call only while the optimizer's state holds these same counter tensors
    (resfast/optim/_step_cache.py), so the list stays right for as long as the store lives."""
    counters = kept.get("steps")
    if counters is None:
        counters = kept["steps"] = resfast._C.StepCounters(steps)
    return counters


def total_norm(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of all CPU `tensors` together, as torch.nn.utils.get_total_norm computes it (in their
    promoted dtype), in one native call instead of one norm per tensor."""
    return _ops.total_norm(tensors)


def grads_norm(param_lists: list[list[Tensor]]) -> tuple[bool, Tensor | None]:
    """Whether any param in the lists has a grad, and their grads' L2 norm in one native call where they
    are all plain strided CPU tensors of the dtypes total_norm takes (else None), read in C++."""
    return resfast._C.grads_norm(param_lists)


def launch(call: FusedCall) -> None:
    """resfast.kernels.fused_optim's Launch: the native op `<op>_`, an absent state as an empty list,
    the options by name (the op schema's)."""
    # The optimizers never route these here (resfast.backends.choose is told the native kernels lack
    # them); a direct caller gets told too rather than a silently plain update.
    if call.master_params is not None or call.stochastic_seed is not None:
        raise NotImplementedError(
            "the native kernels have no master-weight or stochastic-rounding update yet; use the triton or "
            "reference backend"
        )
    lists = [[] if t is None else t for t in call.states]
    if call.kept is not None:
        # A kept call: its params and states stay in a PreparedUpdate, so that a step converts at most its
        # grads (each tensor list costs ~0.1 us per tensor to hand to an op), and none where the step
        # cache had the update read them itself (call.grads None: resfast/optim/_step_cache.py).
        # The store's "native" is the PreparedUpdate (the step cache reads it), "native_absent" the states
        # it was made without.
        absent = tuple(t is None for t in call.states)
        update = call.kept.get("native")
        if update is None or call.kept["native_absent"] != absent:
            if call.grads is None:
                raise RuntimeError("resfast: a kept call without grads must run its prepared update")
            update = call.kept["native"] = resfast._C.PreparedUpdate(call.spec.op, call.params, lists)
            call.kept["native_absent"] = absent
        update.run(call.grads, call.coef, call.grad_scale, call.found_inf, call.grad_clip, **call.options)
        return
    op = getattr(_ops, f"{call.spec.op}_")
    op(
        call.params, call.grads, *lists, call.coef, call.grad_scale, call.found_inf, **call.options,
        grad_clip=call.grad_clip,
    )  # fmt: skip


# The five updates, with resfast.kernels.reference_optim's signatures.
_updates = FusedUpdates(launch)
sgd, rmsprop, adagrad, adam = _updates.sgd, _updates.rmsprop, _updates.adagrad, _updates.adam
lars = _updates.lars
