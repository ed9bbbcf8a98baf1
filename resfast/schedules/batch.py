"""Batch-size schedules: an int >= 1 (samples per optimizer step, over all ranks) as a function of ``t``.

Lengths are in samples, as for the LR schedules. Fractional sizes round to the nearest int (so a
ratio that lands at 127.99999 gives 128, not 127), and never below 1.
"""

from __future__ import annotations

import math
from typing import Literal

from . import _checks
from .base import BatchSchedule, LRSchedule, Schedule, progress

__all__ = ["ConstantBatch", "CoupledBatch", "LinearBatch", "PolynomialBatch", "StepBatch"]


def round_size(size: float) -> int:
    """Nearest int, at least 1."""
    return max(1, math.floor(size + 0.5))


def _max_size(max_size: int | None, low: int, low_name: str) -> int | None:
    if max_size is None:
        return None
    max_size = _checks.integer("max_size", max_size, low=1)
    if max_size < low:
        raise ValueError(f"max_size must be >= {low_name} ({low}), got {max_size}")
    return max_size


class ConstantBatch(BatchSchedule):
    """``size`` at every ``t``."""

    def __init__(self, size: int) -> None:
        self.size = _checks.integer("size", size, low=1)

    def _at(self, t: float) -> int:
        return self.size


class StepBatch(BatchSchedule):
    """``min(base * factor ** floor(t / every), max_size)``: grow by ``factor`` every ``every`` samples."""

    def __init__(self, base: int, every: float, factor: float = 2, max_size: int | None = None) -> None:
        self.base = _checks.integer("base", base, low=1)
        self.every = _checks.positive("every (samples)", every)
        self.factor = _checks.real("factor", factor)
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1 (a batch that grows), got {factor!r}")
        self.max_size = _max_size(max_size, self.base, "base")

    def _at(self, t: float) -> int:
        periods = t // self.every
        if self.max_size is None:
            try:
                return round_size(self.base * self.factor**periods)
            except OverflowError:
                raise ValueError(
                    f"StepBatch size overflows at t={t!r} samples ({self!r}); give max_size"
                ) from None
        # Past the period where the cap is reached, skip the power: it could overflow a float.
        if self.factor > 1 and periods > math.log(self.max_size / self.base, self.factor) + 1:
            return self.max_size
        return min(round_size(self.base * self.factor**periods), self.max_size)


class LinearBatch(BatchSchedule):
    """From ``start`` at ``t = 0`` linearly to ``end`` at ``total`` samples, then ``end``."""

    def __init__(self, start: int, end: int, total: float) -> None:
        self.start = _checks.integer("start", start, low=1)
        self.end = _checks.integer("end", end, low=1)
        self.total = _checks.positive("total (samples)", total)

    def _at(self, t: float) -> int:
        return round_size(self.start + (self.end - self.start) * progress(t, self.total))


class PolynomialBatch(BatchSchedule):
    """``max(base * (1 - min(t, total) / total) ** power, min_size)``: a batch shrinking to ``min_size``."""

    def __init__(self, base: int, total: float, power: float = 1.0, min_size: int = 1) -> None:
        self.base = _checks.integer("base", base, low=1)
        self.total = _checks.positive("total (samples)", total)
        self.power = _checks.positive("power", power)
        self.min_size = _checks.integer("min_size", min_size, low=1)
        if self.min_size > self.base:
            raise ValueError(f"min_size must be <= base ({self.base}), got {min_size}")

    def _at(self, t: float) -> int:
        return max(self.min_size, round_size(self.base * (1.0 - progress(t, self.total)) ** self.power))


class CoupledBatch(BatchSchedule):
    """A batch size tied to an LR schedule ``lr``, with ``lr0 = lr(0)`` taken when this is built.

    - ``mode="proportional"``: ``base_size * lr(t) / lr0``, which keeps ``lr / batch`` constant.
    - ``mode="inverse"``: ``base_size * lr0 / lr(t)``: grow the batch where the LR would decay (Smith et
      al. 2018, "Don't decay the learning rate, increase the batch size"). A ``Plan`` given this batch
      schedule and the same ``lr`` object holds the LR at ``lr0``. Where ``lr(t)`` reaches 0 the size
      is ``max_size``; without one that is an error, so give ``max_size`` for schedules that end at 0.

    Both are capped at ``max_size``. ``lr0`` must be > 0: couple the main schedule, not a warmup that
    starts at 0.
    """

    def __init__(
        self,
        lr_schedule: LRSchedule,
        base_size: int,
        mode: Literal["proportional", "inverse"] = "proportional",
        max_size: int | None = None,
    ) -> None:
        self.lr_schedule = _checks.instance(
            "lr_schedule", lr_schedule, LRSchedule, "an LR schedule (resfast.schedules.LRSchedule)"
        )
        self.base_size = _checks.integer("base_size", base_size, low=1)
        self.mode = _checks.choice("mode", mode, ("proportional", "inverse"))
        self.max_size = _max_size(max_size, self.base_size, "base_size")
        self.lr0 = lr_schedule(0)
        if not self.lr0 > 0:
            raise ValueError(f"CoupledBatch needs lr_schedule(0) > 0 to take ratios to, got {self.lr0!r}")

    def children(self) -> tuple[Schedule, ...]:
        return (self.lr_schedule,)

    def _at(self, t: float) -> int:
        lr = self.lr_schedule(t)
        if self.mode == "proportional":
            size = self.base_size * lr / self.lr0
        elif lr > 0:
            size = self.base_size * self.lr0 / lr
        elif self.max_size is not None:
            return self.max_size
        else:
            raise ValueError(
                f"CoupledBatch(mode='inverse'): lr_schedule({t!r}) = {lr!r} asks for an infinite batch; "
                "give max_size"
            )
        return round_size(size if self.max_size is None else min(size, self.max_size))
