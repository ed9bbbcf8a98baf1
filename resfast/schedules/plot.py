"""PNG of a plan's (or one schedule's) LR and batch size against samples seen. Needs matplotlib."""

from __future__ import annotations

import os
from typing import Any

from . import _checks
from .base import BatchSchedule, LRSchedule
from .plan import Plan

__all__ = ["plot"]


def plot(
    plan_or_schedule: Plan | LRSchedule | BatchSchedule,
    total: float,
    path: str | os.PathLike[str],
    *,
    points: int = 1000,
) -> str:
    """Draw LR and/or batch size at ``points`` evenly spaced sample counts in ``[0, total]`` and save a PNG.

    A plan gives two panels (LR, batch size), a schedule one. Stateful schedules are drawn at their
    current state. Returns the path written.
    """
    total = _checks.positive("total (samples)", total)
    points = _checks.integer("points", points, low=2)
    if isinstance(plan_or_schedule, Plan):
        curves = [("learning rate", plan_or_schedule.lr_at), ("batch size", plan_or_schedule.batch_size_at)]
        title = f"lr: {plan_or_schedule.lr_schedule!r}\nbatch: {plan_or_schedule.batch_schedule!r}"
    elif isinstance(plan_or_schedule, LRSchedule):
        curves, title = [("learning rate", plan_or_schedule)], repr(plan_or_schedule)
    elif isinstance(plan_or_schedule, BatchSchedule):
        curves, title = [("batch size", plan_or_schedule)], repr(plan_or_schedule)
    else:
        raise TypeError(f"plot needs a Plan, an LRSchedule or a BatchSchedule, got {plan_or_schedule!r}")
    try:
        # Figure without pyplot: no global backend or window state, works headless.
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "resfast.schedules.plot needs matplotlib: pip install matplotlib (or resfast[train])"
        ) from e

    ts = [total * i / (points - 1) for i in range(points)]
    fig: Any = Figure(figsize=(7, 2.6 * len(curves)), layout="constrained")
    axes = fig.subplots(len(curves), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, curve) in zip(axes, curves, strict=True):
        # Steps, not lines: sizes (and Step/MultiStep LRs) jump, and a slanted line would hide where.
        ax.plot(ts, [curve(t) for t in ts], drawstyle="steps-post")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("samples seen")
    fig.suptitle(title, fontsize=7)
    fig.savefig(path, dpi=120)
    return os.fspath(path)
