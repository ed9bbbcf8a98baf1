"""Any resfast LR schedule as a ``torch.optim.lr_scheduler.LRScheduler``, for existing torch loops."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from . import _checks
from .base import LRSchedule
from .plan import lr_ratios

__all__ = ["SampleClockLR", "as_lr_scheduler"]


class SampleClockLR(LRScheduler):
    """torch scheduler over a resfast schedule, with a fixed number of samples per ``step()``.

    After ``n`` calls to ``step()`` the first param group's LR is ``schedule(n * samples_per_step)``; the
    other groups keep their initial ratio to it, as with ``Plan``. Loss-driven schedules are fed with
    ``scheduler.schedule.observe(loss)``. ``state_dict()`` is torch's plus the schedule's state (plain
    data, so ``torch.load(weights_only=True)`` reads it).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, samples_per_step: float
    ) -> None:
        self.schedule = _checks.instance(
            "schedule", schedule, LRSchedule, "an LR schedule (resfast.schedules)"
        )
        self.samples_per_step = _checks.positive("samples_per_step", samples_per_step)
        optimizer = _checks.instance("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
        self._ratios = lr_ratios(optimizer)  # before torch's __init__, which already calls get_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        lr = self.schedule(self.last_epoch * self.samples_per_step)
        return [lr * ratio for ratio in self._ratios]

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "schedule")}
        state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.schedule.load_state_dict(state.pop("schedule"))
        self.__dict__.update(state)


def as_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule, samples_per_step: float
) -> SampleClockLR:
    """Wrap ``schedule`` as a torch ``LRScheduler`` stepped once per ``samples_per_step`` samples."""
    return SampleClockLR(optimizer, schedule, samples_per_step)
