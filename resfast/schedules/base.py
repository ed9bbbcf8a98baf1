"""What every schedule is: a pure function of the sample clock, plus explicit state where it has one.

A schedule is called as ``schedule(t)`` with ``t`` the number of samples seen (>= 0). Composite schedules
(``Warmup``, ``Piecewise``, ``CoupledBatch``, ...) name their parts in ``children()``; loss-driven and
measurement-driven leaves keep state and override ``_observe`` / ``_state`` / ``_load_state``. Walking the
tree once, without repeating a node shared by two parents, is how ``observe`` reaches every stateful
leaf exactly once (an LR schedule used both as the plan's LR and inside ``CoupledBatch`` must not see
each loss twice) and how ``state_dict`` captures all of them.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, SupportsFloat

from . import _checks

__all__ = ["BatchSchedule", "LRSchedule", "Schedule"]


class Schedule(ABC):
    """A value as a function of ``t``, the number of samples seen."""

    #: True for schedules whose value depends on state that ``observe`` or a measurement changes.
    stateful: ClassVar[bool] = False

    def __call__(self, t: float) -> float:
        return self._at(_checks.non_negative("t (samples seen)", t))

    @abstractmethod
    def _at(self, t: float) -> float:
        """The value at ``t`` samples, ``t`` already checked to be a finite number >= 0."""

    def children(self) -> tuple[Schedule, ...]:
        """The schedules this one is built from (empty for a leaf)."""
        return ()

    def observe(self, value: SupportsFloat) -> None:
        """Give a loss (or metric) to every loss-driven schedule in this tree; others ignore it."""
        observe_all((self,), value)

    def state_dict(self) -> dict[str, Any]:
        """The state of every stateful schedule in this tree (plain floats and ints)."""
        return state_of((self,))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_of((self,), state_dict)

    def _observe(self, value: float) -> None:  # noqa: B027 - a no-op by design: most schedules ignore losses
        """Update from one observed loss; only loss-driven leaves override this."""

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} declares stateful but keeps no state")

    def _load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} declares stateful but keeps no state")

    def __repr__(self) -> str:
        # Every schedule stores its constructor arguments under their own names, so the repr is the
        # call that rebuilds it.
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


class LRSchedule(Schedule):
    """A learning rate as a function of samples seen."""


class BatchSchedule(Schedule):
    """A batch size (an int >= 1, in samples per optimizer step) as a function of samples seen."""

    def __call__(self, t: float) -> int:
        return int(super().__call__(t))

    @abstractmethod
    def _at(self, t: float) -> int: ...


def progress(t: float, total: float) -> float:
    """Fraction of ``total`` samples done at ``t``, held at 1 past the end."""
    return min(t, total) / total


def nodes(roots: Iterable[Schedule]) -> list[Schedule]:
    """Every schedule reachable from ``roots``, depth first, each once (by identity)."""
    seen: set[int] = set()
    out: list[Schedule] = []
    stack = list(roots)[::-1]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        stack.extend(node.children()[::-1])
    return out


def observe_all(roots: Iterable[Schedule], value: SupportsFloat) -> None:
    value = float(value)  # once, so a 0-dim tensor costs one host sync, not one per schedule
    for node in nodes(roots):
        node._observe(value)


def state_of(roots: Iterable[Schedule]) -> dict[str, Any]:
    return {"states": [node._state() for node in nodes(roots) if node.stateful]}


def load_state_of(roots: Iterable[Schedule], state_dict: dict[str, Any]) -> None:
    stateful = [node for node in nodes(roots) if node.stateful]
    states = state_dict.get("states") if isinstance(state_dict, dict) else None
    if not isinstance(states, list) or len(states) != len(stateful):
        found = len(states) if isinstance(states, list) else state_dict
        raise ValueError(
            f"state_dict does not fit this schedule: it needs {len(stateful)} schedule state(s) "
            f"({', '.join(type(n).__name__ for n in stateful) or 'none'}), got {found!r}"
        )
    for node, state in zip(stateful, states, strict=True):
        node._load_state(state)
