"""A param group's kernel calls, kept from one step to the next.

Planning a step (bucketing params by device and dtype, choosing backends, creating and collecting
states, checking every tensor's layout) costs Python time per parameter, and on a GPU that host time,
not the kernels, bounds an optimizer step. Between steps almost nothing of it changes: only the grads
are new tensors (``zero_grad(set_to_none=True)``). So the optimizer keeps the kernel calls of each
group's last step and, at the next one, reuses them with the new grads after cheap checks:

- the same params have grads, in the same order (identities);
- the group's options still select the same state tensors, and its ``capturable`` flag is unchanged;
- the optimizer's state is the same dict, with the same per-param dicts, each holding the same state
  tensors (identity checks, at C speed; where one native call updates the whole group,
  ``resfast._C.PreparedUpdate.holds`` makes them in C++);
- one native check per call: each param still has the address it had (``p.data = ...``,
  ``model.to(dtype)`` or a move give it another), every grad is strided, and every grad of a fast
  call has its param's dtype, device, shape and strides. Where one native call updates the whole
  group (the usual case: one dtype, every param with a grad), the update reads the grads itself
  (``resfast._C.PreparedUpdate.load``, which also checks the group's params are its own): no grad
  crosses from C++ to Python and back.

Anything else plans the step afresh, which also refreshes the cache. ``load_state_dict`` (through
``__setstate__``) and ``add_param_group`` empty it. Only steps that created no state are kept (SGD
deletes the momentum buffers of a first step that GradScaler skips), and only for plain tensors
(DTensor shards and complex views are re-derived each step). The optimizer bypasses the cache while
torch.compile traces its step.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from resfast.optim._layout import grads_fit

_GRAD = operator.attrgetter("grad")


@dataclass
class Batch:
    """One kernel call: its backend and low-precision mode, and its tensors as the kernels see them
    (local shards of DTensors, real views of complex tensors)."""

    backend: str
    mode: str | None  # resfast.optim._base.MASTER, STOCHASTIC or None
    owners: list[Tensor]  # the params themselves: keys of the optimizer's state
    state_dicts: list[dict[str, Any]]  # their states (SGD deletes a skipped first step's buffers)
    params: list[Tensor]
    grads: list[Tensor] | None  # None: its kept native update has read this step's grads (StepCache.calls)
    states: dict[str, list[Tensor]]  # per state key, in kernel order
    steps: list[Tensor]
    masters: list[Tensor] | None  # fp32 master copies (mode MASTER)
    fresh: list[bool]  # per param: were its states created for this step (SGD's momentum starts)
    # The backend's store for this call (resfast.kernels.fused_optim.FusedCall.kept): one dict, shared
    # by the copies the cache makes of this call at later steps.
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)

    def optional(self, key: str) -> list[Tensor | None]:
        """An optional state's list (None per param when the option is off)."""
        return self.states.get(key, [None] * len(self.params))


@dataclass
class _Entry:
    group: dict[str, Any]
    ids: tuple[int, ...]  # the params with grads, in order
    keys: tuple[str, ...]
    capturable: bool
    state: int  # the optimizer's state dict (identity)
    state_values: list[dict[str, Any]]  # its per-param dicts, in order
    # Every state tensor the calls use, as (its param's dict, key, tensor) in three flat lists.
    dicts: list[dict[str, Any]]
    keys_used: list[str]
    tensors: list[Tensor]
    # Each call, where its params are among `ids`, and their addresses.
    calls: list[tuple[Batch, list[int], list[int]]]
    # The native update (resfast._C.PreparedUpdate) of the group's one call, when that call updates every
    # param of the group: it then checks the params and reads the grads itself.
    native: Any = None


class StepCache:
    """The kernel calls of each param group's last step (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def clear(self) -> None:
        self._entries.clear()

    def calls(self, group: dict[str, Any], keys: tuple[str, ...], state: dict) -> list[Batch] | None:
        """The group's kernel calls for this step with its current grads, or None to plan afresh. The
        calls are the kept ones with this step's grads set: they serve this step only."""
        entry = self._entries.get(id(group))
        if entry is None or entry.group is not group:
            return None
        capturable = bool(group.get("capturable"))
        if entry.keys != keys or entry.capturable != capturable or entry.state != id(state):
            return None
        if entry.native is not None:
            # The native update checks the state (as below, in C++) and the group's params, and reads
            # the grads itself.
            if not entry.native.holds(state) or not entry.native.load(group["params"]):
                return None
            call = entry.calls[0][0]
            call.grads = None  # the native update runs with the grads it loaded
            return [call]
        # The same per-param state dicts, each still holding the same tensors (the user may assign a
        # new state tensor, or a new dict): identity checks at C speed, no per-tensor Python code.
        values = list(state.values())
        if len(values) != len(entry.state_values) or not all(map(operator.is_, values, entry.state_values)):
            return None
        if not all(map(operator.is_, map(dict.get, entry.dicts, entry.keys_used), entry.tensors)):
            return None
        params = group["params"]
        grads = list(map(_GRAD, params))  # one pass over the params, at C speed
        if all(map(operator.is_not, grads, itertools.repeat(None))):
            with_grad = params
        else:
            with_grad = [p for p, g in zip(params, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        if entry.ids != tuple(map(id, with_grad)):
            return None
        calls = []
        for call, positions, addresses in entry.calls:
            call_grads = grads if len(positions) == len(grads) else [grads[i] for i in positions]
            if not grads_fit(call.params, call_grads, addresses, layout=call.backend != "reference"):
                return None
            calls.append(call_grads)
        for (call, _, _), call_grads in zip(entry.calls, calls, strict=True):
            call.grads = call_grads  # set only once every call fits: a refused step leaves them as they were
        return [call for call, _, _ in entry.calls]

    def unload(self) -> None:
        """Release the grads that native updates loaded for a step that will not run them (it raised
        while planning another group): they would hold their memory until the next step."""
        for entry in self._entries.values():
            if entry.native is not None:
                entry.native.unload()

    def keep(self, group: dict[str, Any], keys: tuple[str, ...], state: dict, calls: list[Batch]) -> None:
        """Keep a step's calls for the next step, when they may be reused (module docstring). A group
        planned afresh always drops what was kept for it: the plan may have replaced its states."""
        self._entries.pop(id(group), None)
        with_grad = [p for p in group["params"] if p.grad is not None]
        if any(any(call.fresh) for call in calls):
            return
        if any(g.is_sparse for call in calls if call.backend == "reference" for g in call.grads):
            return
        plain = (Tensor, torch.nn.Parameter)
        if any(type(p) not in plain or p.is_complex() for p in with_grad):
            return
        used = [
            (d, key, t)
            for call in calls
            for key, tensors in (
                *call.states.items(),
                ("step", call.steps),
                ("master_param", call.masters or []),
            )
            for d, t in zip(call.state_dicts, tensors, strict=False)
        ]
        position = {id(p): i for i, p in enumerate(with_grad)}
        native = None
        if len(calls) == 1 and len(calls[0].owners) == len(group["params"]):
            native = calls[0].kept.get("native")  # resfast.kernels.cext.launch's, once it has run
        dicts, keys_used, tensors = [d for d, _, _ in used], [k for _, k, _ in used], [t for _, _, t in used]
        state_values = list(state.values())
        if native is not None:
            native.watch(state_values, dicts, keys_used, tensors)
        self._entries[id(group)] = _Entry(
            group=group,
            ids=tuple(map(id, with_grad)),
            keys=keys,
            capturable=bool(group.get("capturable")),
            state=id(state),
            state_values=state_values,
            dicts=dicts,
            keys_used=keys_used,
            tensors=tensors,
            calls=[
                (call, [position[id(p)] for p in call.owners], [p.data_ptr() for p in call.params])
                for call in calls
            ],
            native=native,
        )
