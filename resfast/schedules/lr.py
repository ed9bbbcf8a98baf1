"""Learning-rate schedules as pure functions of ``t``, the number of samples seen.

Every length (``every``, ``total``, ``samples``, milestones, boundaries) is in samples, so the curve
does not move when the batch size changes. Schedules that end (``Polynomial``, ``Cosine``, ``Warmup``,
``OneCycle``) hold their final value for ``t`` past the end.

With a constant batch of ``B`` samples per step, torch's schedulers are these schedules with every
length multiplied by ``B``: ``StepLR(step_size=s)`` is ``Step(every=s*B)``, ``MultiStepLR`` is
``MultiStep`` with milestones times ``B``, ``ExponentialLR`` is ``Exponential(every=B)``,
``PolynomialLR(total_iters=n)`` is ``Polynomial(total=n*B)``, ``CosineAnnealingLR(T_max=n)`` is
``Cosine(total=n*B)`` up to ``T_max`` (torch's curve rises again after it; this one holds),
``LinearLR(start_factor=f, total_iters=n)`` is ``Warmup(Constant(lr), n*B, f)``, and ``OneCycleLR``
is ``OneCycle.from_torch``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence

from . import _checks
from .base import LRSchedule, Schedule, progress

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "InverseTime",
    "MultiStep",
    "OneCycle",
    "Piecewise",
    "Polynomial",
    "Step",
    "Warmup",
]


class Constant(LRSchedule):
    """``value`` at every ``t``."""

    def __init__(self, value: float) -> None:
        self.value = _checks.non_negative("value", value)

    def _at(self, t: float) -> float:
        return self.value


class Step(LRSchedule):
    """``base * gamma ** floor(t / every)``: multiply by ``gamma`` every ``every`` samples."""

    def __init__(self, base: float, every: float, gamma: float = 0.1) -> None:
        self.base = _checks.non_negative("base", base)
        self.every = _checks.positive("every (samples)", every)
        self.gamma = _checks.positive("gamma", gamma)

    def _at(self, t: float) -> float:
        # `//` is the exact floor of the quotient, so a boundary reached exactly counts.
        return self.base * self.gamma ** (t // self.every)


class MultiStep(LRSchedule):
    """``base * gamma ** (number of milestones <= t)``; milestones in samples, any order, repeats count."""

    def __init__(self, base: float, milestones: Iterable[float], gamma: float = 0.1) -> None:
        self.base = _checks.non_negative("base", base)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise TypeError(f"milestones must be an iterable of sample counts, got {milestones!r}")
        self.milestones = tuple(sorted(_checks.non_negative("milestone (samples)", m) for m in milestones))
        self.gamma = _checks.positive("gamma", gamma)

    def _at(self, t: float) -> float:
        return self.base * self.gamma ** bisect_right(self.milestones, t)


class Exponential(LRSchedule):
    """``base * gamma ** (t / every)``: a factor ``gamma`` per ``every`` samples, applied continuously."""

    def __init__(self, base: float, gamma: float, every: float) -> None:
        self.base = _checks.non_negative("base", base)
        self.gamma = _checks.positive("gamma", gamma)
        self.every = _checks.positive("every (samples)", every)

    def _at(self, t: float) -> float:
        return self.base * self.gamma ** (t / self.every)


class Polynomial(LRSchedule):
    """``(base - end) * (1 - min(t, total) / total) ** power + end``."""

    def __init__(self, base: float, total: float, power: float = 1.0, end: float = 0.0) -> None:
        self.base = _checks.non_negative("base", base)
        self.total = _checks.positive("total (samples)", total)
        self.power = _checks.positive("power", power)
        self.end = _checks.non_negative("end", end)

    def _at(self, t: float) -> float:
        return (self.base - self.end) * (1.0 - progress(t, self.total)) ** self.power + self.end


class InverseTime(LRSchedule):
    """``base / (1 + rate * t / every)``."""

    def __init__(self, base: float, every: float, rate: float = 1.0) -> None:
        self.base = _checks.non_negative("base", base)
        self.every = _checks.positive("every (samples)", every)
        self.rate = _checks.non_negative("rate", rate)

    def _at(self, t: float) -> float:
        return self.base / (1.0 + self.rate * t / self.every)


class Cosine(LRSchedule):
    """``end + (base - end) * (1 + cos(pi * min(t, total) / total)) / 2``."""

    def __init__(self, base: float, total: float, end: float = 0.0) -> None:
        self.base = _checks.non_negative("base", base)
        self.total = _checks.positive("total (samples)", total)
        self.end = _checks.non_negative("end", end)

    def _at(self, t: float) -> float:
        return self.end + (self.base - self.end) * (1.0 + math.cos(math.pi * progress(t, self.total))) / 2.0


class Warmup(LRSchedule):
    """``schedule(t)`` times a factor rising linearly from ``start_factor`` to 1 over the first ``samples``.

    The wrapped schedule runs on the same clock (it is not delayed by the warmup), as torch's
    ``ChainedScheduler(LinearLR, ...)`` does; to start a schedule after the warmup instead, use
    ``Piecewise``.
    """

    def __init__(self, schedule: LRSchedule, samples: float, start_factor: float = 0.0) -> None:
        self.schedule = _lr_schedule("schedule", schedule)
        self.samples = _checks.positive("samples (warmup length)", samples)
        self.start_factor = _checks.in_range("start_factor", start_factor, 0.0, 1.0)

    def children(self) -> tuple[Schedule, ...]:
        return (self.schedule,)

    def _at(self, t: float) -> float:
        factor = self.start_factor + (1.0 - self.start_factor) * progress(t, self.samples)
        return self.schedule(t) * factor


class Piecewise(LRSchedule):
    """``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]`` samples, on a clock restarted at 0.

    As torch's ``SequentialLR``: piece ``i`` sees ``t - boundaries[i-1]``, so
    ``Piecewise([Warmup(Constant(lr), w), Cosine(lr, total - w)], [w])`` warms up, then runs a whole
    cosine. ``observe`` reaches every piece.
    """

    def __init__(self, schedules: Sequence[LRSchedule], boundaries: Sequence[float]) -> None:
        self.schedules = tuple(_lr_schedule("schedules[i]", s) for s in schedules)
        self.boundaries = tuple(_checks.positive("boundary (samples)", b) for b in boundaries)
        if len(self.boundaries) != len(self.schedules) - 1 or not self.schedules:
            raise ValueError(
                f"Piecewise needs one boundary fewer than schedules, got {len(self.schedules)} schedules "
                f"and boundaries {list(boundaries)!r}"
            )
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)!r}")

    def children(self) -> tuple[Schedule, ...]:
        return self.schedules

    def _at(self, t: float) -> float:
        i = bisect_right(self.boundaries, t)
        return self.schedules[i](t - self.boundaries[i - 1] if i else t)


class OneCycle(LRSchedule):
    """torch ``OneCycleLR``'s cosine shape (``anneal_strategy="cos"``, two phases) on the sample clock.

    Rises from ``max_lr / div_factor`` at ``t = 0`` to ``max_lr`` at ``pct_start * total`` samples, then
    falls to ``max_lr / div_factor / final_div_factor`` at ``total`` samples and holds there. Momentum
    is not cycled.
    """

    def __init__(
        self,
        max_lr: float,
        total: float,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ) -> None:
        self.max_lr = _checks.non_negative("max_lr", max_lr)
        self.total = _checks.positive("total (samples)", total)
        # pct_start = 1 would leave no samples to anneal down in (torch divides by zero there).
        self.pct_start = _checks.in_range("pct_start", pct_start, 0.0, 1.0, high_open=True)
        self.div_factor = _checks.positive("div_factor", div_factor)
        self.final_div_factor = _checks.positive("final_div_factor", final_div_factor)

    @classmethod
    def from_torch(
        cls,
        max_lr: float,
        total_steps: int,
        samples_per_step: float,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ) -> OneCycle:
        """The schedule equal to ``OneCycleLR(opt, max_lr, total_steps, pct_start=..., ...)`` stepped once per
        ``samples_per_step`` samples.

        torch places the peak at step ``pct_start * total_steps - 1`` and the minimum at step
        ``total_steps - 1`` (the last step it allows), so in samples the cycle ends
        ``samples_per_step`` before ``total_steps * samples_per_step``.
        """
        total_steps = _checks.integer("total_steps", total_steps, low=2)
        samples_per_step = _checks.positive("samples_per_step", samples_per_step)
        peak_step = _checks.real("pct_start", pct_start) * total_steps - 1
        if not 0 <= peak_step < total_steps - 1:
            raise ValueError(
                f"pct_start * total_steps - 1 (torch's peak step) must be in [0, total_steps - 1), "
                f"got pct_start={pct_start!r}, total_steps={total_steps}"
            )
        return cls(
            max_lr,
            (total_steps - 1) * samples_per_step,
            peak_step / (total_steps - 1),
            div_factor,
            final_div_factor,
        )

    def _at(self, t: float) -> float:
        initial = self.max_lr / self.div_factor
        peak = self.pct_start * self.total
        if t < peak:
            return _anneal_cos(initial, self.max_lr, t / peak)
        t = min(t, self.total)
        return _anneal_cos(self.max_lr, initial / self.final_div_factor, (t - peak) / (self.total - peak))


def _anneal_cos(start: float, end: float, pct: float) -> float:
    # torch's OneCycleLR._annealing_cos, operation for operation, so the two agree to the last bits.
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _lr_schedule(name: str, value: object) -> LRSchedule:
    return _checks.instance(name, value, LRSchedule, "an LR schedule (resfast.schedules.LRSchedule)")
