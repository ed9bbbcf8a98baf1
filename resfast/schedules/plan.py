"""The plan: one LR schedule and one batch-size schedule on one sample clock, driving an optimizer."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal, SupportsFloat

import torch

from . import _checks
from .base import BatchSchedule, LRSchedule, load_state_of, observe_all, state_of
from .batch import ConstantBatch, CoupledBatch
from .clock import SampleClock
from .lr import Constant
from .sampler import PlanBatchSampler

__all__ = ["Plan", "lr_ratios", "write_lr"]


def lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's initial LR over the first group's; records ``initial_lr`` as torch's schedulers do.

    A schedule gives the first group's LR; the others keep their initial proportion to it. Going through
    ``initial_lr`` (saved in the optimizer's ``state_dict``) keeps the proportions right on resume even if
    the current LR of the first group is 0, as at the start of a warmup.
    """
    groups = optimizer.param_groups
    for group in groups:
        lr = group["lr"]
        group.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
    first = float(groups[0]["initial_lr"])
    if not first > 0:
        raise ValueError(
            f"the first param group's initial lr must be > 0 (other groups' LRs are kept as multiples of "
            f"it), got {first!r}"
        )
    return [float(group["initial_lr"]) / first for group in groups]


def write_lr(optimizer: torch.optim.Optimizer, ratios: list[float], lr: float) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr * ratio)  # in place: a tensor LR may be captured by a CUDA graph
        else:
            group["lr"] = lr * ratio


class Plan:
    """Learning rate and batch size as functions of samples seen, driving ``optimizer``'s LR.

    Args:
        optimizer: its param groups get ``lr_at(samples) * ratio``, ``ratio`` being the group's initial LR
            over the first group's (so the first group gets the schedule's LR exactly).
        lr: an ``LRSchedule`` or a number (a ``Constant``).
        batch: a ``BatchSchedule`` or an int (a ``ConstantBatch``): the *global* batch, over all ranks.
            With ``CoupledBatch(lr, ..., mode="inverse")`` of the same ``lr`` object, the LR is held at
            ``lr(0)`` and the batch grows instead.
        lr_scaling: ``"linear"`` multiplies the LR by ``batch / base_batch``, ``"sqrt"`` by its square
            root; ``None`` leaves it. Not with ``CoupledBatch``, which already ties the two.
        base_batch: the batch at which the LR schedule holds unscaled; default ``batch(0)``.

    Call ``step()`` after each optimizer step and ``observe(loss)`` when a loss-driven schedule should
    see one. ``state_dict()`` holds the clock, every stateful schedule and the sampler's epoch, which is
    all a resume needs.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: LRSchedule | float,
        batch: BatchSchedule | int,
        lr_scaling: Literal["linear", "sqrt"] | None = None,
        base_batch: int | None = None,
    ) -> None:
        self.optimizer = _checks.instance(
            "optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer"
        )
        if not isinstance(lr, LRSchedule):
            lr = Constant(lr)
        if not isinstance(batch, BatchSchedule):
            batch = ConstantBatch(batch)
        self.lr_schedule: LRSchedule = lr
        self.batch_schedule: BatchSchedule = batch
        self.lr_scaling = _checks.choice("lr_scaling", lr_scaling, (None, "linear", "sqrt"))
        if isinstance(batch, CoupledBatch):
            if lr_scaling is not None:
                raise ValueError(
                    f"lr_scaling={lr_scaling!r} with CoupledBatch ties LR and batch twice; use one of them"
                )
            if batch.mode == "inverse" and batch.lr_schedule is lr:
                self.lr_schedule = Constant(batch.lr0)
        self.base_batch = batch(0) if base_batch is None else _checks.integer("base_batch", base_batch, low=1)
        self.clock = SampleClock()
        #: the batch sampler's settings for the epoch in progress; None before it first draws.
        self.sampler_settings: dict[str, Any] | None = None
        #: global sizes of the batches the sampler has drawn and training has not stepped past yet.
        self.drawn: deque[int] = deque()
        self._ratios = lr_ratios(optimizer)
        self._write_lr()

    @property
    def samples(self) -> int:
        """Samples seen (over all ranks)."""
        return self.clock.samples

    @property
    def steps(self) -> int:
        return self.clock.steps

    @property
    def epoch(self) -> int:
        """The batch sampler's epoch (0 before it first draws)."""
        return self.clock.epoch

    @property
    def batch_size(self) -> int:
        """The global batch size the schedule gives now (the epoch's last batch may be smaller)."""
        return self.batch_size_at(self.clock.samples)

    @property
    def lr(self) -> float:
        """The first param group's LR for the next step."""
        return self.lr_at(self.clock.samples)

    def batch_size_at(self, t: float) -> int:
        return self.batch_schedule(t)

    def lr_at(self, t: float) -> float:
        """The first param group's LR after ``t`` samples: the LR schedule, times the batch scaling."""
        lr = self.lr_schedule(t)
        if self.lr_scaling is not None:
            ratio = self.batch_schedule(t) / self.base_batch
            lr *= ratio if self.lr_scaling == "linear" else math.sqrt(ratio)
        if not math.isfinite(lr):
            raise ValueError(
                f"the LR at t={t!r} samples is {lr!r} ({self.lr_schedule!r}); refusing to write it"
            )
        return lr

    def step(self, samples_in_step: int | None = None) -> None:
        """Advance the clock by one optimizer step and write the new LR into the optimizer.

        ``samples_in_step`` is the global number of samples the step trained on. By default it is the
        size of the global batch the batch sampler drew for this step (or ``batch_size`` when no
        sampler is drawing); a different number given while the sampler is drawing is an error, as the
        clock would then leave the sampler's batches.
        """
        if self.drawn:
            drawn = self.drawn.popleft()
            if samples_in_step is not None and samples_in_step != drawn:
                raise ValueError(
                    f"plan.step({samples_in_step!r}): the batch sampler drew a global batch of {drawn} "
                    "samples for this step; call plan.step() to use it (on every rank)"
                )
            samples_in_step = drawn
        elif samples_in_step is None:
            samples_in_step = self.batch_size
        self.clock.advance(samples_in_step)
        self._write_lr()

    def observe(self, loss: SupportsFloat) -> None:
        """Give a loss (or metric) to every loss-driven schedule of the plan, then rewrite the LR."""
        observe_all((self.lr_schedule, self.batch_schedule), loss)
        self._write_lr()

    def batch_sampler(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> PlanBatchSampler:
        """A sampler for ``DataLoader(dataset, batch_sampler=...)`` that follows this plan's batch sizes.

        See ``resfast.schedules.sampler`` for the guarantees: each index once per epoch, order fixed by
        ``(seed, epoch)``, this rank's contiguous share of each global batch, exact mid-epoch resume.
        """
        return PlanBatchSampler(
            self,
            num_samples,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "clock": self.clock.state_dict(),
            "schedules": state_of((self.lr_schedule, self.batch_schedule)),
            "sampler": None if self.sampler_settings is None else dict(self.sampler_settings),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the plan must be built with the same schedules and optimizer groups."""
        load_state_of((self.lr_schedule, self.batch_schedule), state_dict["schedules"])
        self.clock.load_state_dict(state_dict["clock"])
        self.sampler_settings = None if state_dict["sampler"] is None else dict(state_dict["sampler"])
        self.drawn.clear()
        self._write_lr()

    def _write_lr(self) -> None:
        if len(self._ratios) != len(self.optimizer.param_groups):  # add_param_group since the last write
            self._ratios = lr_ratios(self.optimizer)
        write_lr(self.optimizer, self._ratios, self.lr)
