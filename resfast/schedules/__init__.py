"""Learning-rate and batch-size schedules on one clock: samples seen.

Every schedule is callable, ``schedule(t)`` with ``t`` in samples, and pure except for the loss- or
measurement-driven ones (``LossBackoff``, ``Plateau``, ``NoiseScaleBatch``), whose state is explicit in
``state_dict()``. A ``Plan`` drives an optimizer's LR from one LR schedule and one batch schedule,
hands out a ``DataLoader`` batch sampler that follows the batch schedule, and resumes exactly from its
``state_dict()``. See docs/schedules.md.

Importing this package imports torch and nothing heavier; ``plot`` imports matplotlib when called.
"""

from .base import BatchSchedule, LRSchedule, Schedule
from .batch import ConstantBatch, CoupledBatch, LinearBatch, PolynomialBatch, StepBatch
from .clock import SampleClock
from .feedback import LossBackoff, Plateau
from .lr import (
    Constant,
    Cosine,
    Exponential,
    InverseTime,
    MultiStep,
    OneCycle,
    Piecewise,
    Polynomial,
    Step,
    Warmup,
)
from .noise import GradientNoiseScale, NoiseScaleBatch
from .plan import Plan
from .plot import plot
from .sampler import PlanBatchSampler
from .torch_adapter import SampleClockLR, as_lr_scheduler

__all__ = [
    "BatchSchedule",
    "Constant",
    "ConstantBatch",
    "Cosine",
    "CoupledBatch",
    "Exponential",
    "GradientNoiseScale",
    "InverseTime",
    "LRSchedule",
    "LinearBatch",
    "LossBackoff",
    "MultiStep",
    "NoiseScaleBatch",
    "OneCycle",
    "Piecewise",
    "Plan",
    "PlanBatchSampler",
    "Plateau",
    "Polynomial",
    "PolynomialBatch",
    "SampleClock",
    "SampleClockLR",
    "Schedule",
    "Step",
    "StepBatch",
    "Warmup",
    "as_lr_scheduler",
    "plot",
]
