"""A batch sampler whose sizes follow a ``Plan``: ``DataLoader(data, batch_sampler=plan.batch_sampler(n))``.

How it stays exact:

- **Order.** Each epoch visits a permutation of ``range(num_samples)`` that depends on ``(seed, epoch)``
  only, so every rank computes the same one. Global batches are consecutive slices of it, so each index
  is drawn exactly once per epoch, whatever the sizes.
- **Sizes.** The global batch that starts ``t`` samples into training has ``plan.batch_size_at(t)``
  samples, where ``t`` counts the samples this sampler has already *drawn*. A DataLoader draws
  ``prefetch_factor * num_workers`` batches ahead of training; since each size is a function of the
  samples drawn before it, not of the plan's clock at draw time, prefetching does not change it.
  (``NoiseScaleBatch`` is the exception: its size is the estimate current at draw time.)
- **Steps.** Each drawn global size is queued on the plan; ``plan.step()`` without an argument advances
  the clock by the size of the batch being trained, which is also how a rank that sees only its share
  learns the global size.
- **Ranks.** Rank ``r`` gets the ``r``-th contiguous share of every global batch: ``size // world_size``
  samples, one more for the first ``size % world_size`` ranks. Every rank draws the same number of
  batches. A global size below ``world_size`` is an error (a rank would get nothing).
- **End of epoch.** When fewer samples remain than the next size: with ``drop_last`` they are dropped
  (on every rank); without it they form a last, smaller global batch. Without ``drop_last``, a batch
  that would leave fewer than ``world_size`` samples takes them too (one batch up to
  ``world_size - 1`` samples larger), so that the last batch still gives every rank a sample.
- **Resume.** The epoch, the clock at its start, and the sampler's settings live in the plan's clock
  and ``state_dict``. A new iteration continues the epoch the plan's clock is in, from the samples the
  plan has *stepped* through (not the ones prefetched); once that epoch is used up it starts the next.
  So step the plan once per batch trained, and a sampler built after ``plan.load_state_dict`` yields
  exactly the batches the interrupted run had left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import Sampler

from . import _checks
from .clock import SampleClock


class BatchPlan(Protocol):
    """What the sampler needs of its plan (``resfast.schedules.Plan``): the clock, the batch size at a
    time, the sizes drawn and not yet stepped, and the settings the epoch in progress was drawn with.
    A protocol, so that this module does not import the plan that builds it."""

    clock: SampleClock
    drawn: deque[int]
    sampler_settings: dict[str, Any] | None

    def batch_size_at(self, t: float) -> int: ...


__all__ = ["PlanBatchSampler"]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _fmix64(x: int) -> int:
    # MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the output.
    x = ((x ^ (x >> 33)) * 0xFF51AFD7ED558CCD) & _MASK64
    x = ((x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53) & _MASK64
    return x ^ (x >> 33)


def _fmix32(x: int) -> int:
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def generator_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation.

    torch's CPU generator keeps only the low 32 bits of its seed (``manual_seed(s)`` and
    ``manual_seed(s + 2**32)`` give the same numbers), so ``(seed, epoch)`` is hashed to 32 bits: for a
    given seed the map from epoch is a bijection on 32 bits (an odd multiplier, then a bijective mix),
    so no two of a run's first 2**32 epochs share an order.
    """
    return _fmix32((_fmix64(seed & _MASK64) + epoch * 0x9E3779B1) & _MASK32)


class PlanBatchSampler(Sampler[list[int]]):
    """Yields this rank's list of dataset indices for each global batch; built by ``Plan.batch_sampler``."""

    def __init__(
        self,
        plan: BatchPlan,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.plan = plan
        self.world_size = _checks.integer("world_size", world_size, low=1)
        self.num_samples = _checks.integer("num_samples", num_samples, low=self.world_size)
        self.rank = _checks.integer("rank", rank, low=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.shuffle = _checks.instance("shuffle", shuffle, bool, "a bool")
        self.seed = _checks.integer("seed", seed, low=-(2**63))
        self.drop_last = _checks.instance("drop_last", drop_last, bool, "a bool")
        self._order_cache: tuple[int, torch.Tensor] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What fixes the global batches; a resumed epoch must be drawn with the same."""
        return {
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's order of indices (int64), identical on every rank."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(generator_seed(self.seed, epoch))
                order = torch.randperm(self.num_samples, generator=generator)
            else:
                order = torch.arange(self.num_samples)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _global_size(self, t: int, position: int) -> int:
        """Size of the global batch drawn at clock ``t``, ``position`` samples into the epoch (0: the end)."""
        remaining = self.num_samples - position
        if remaining <= 0:
            return 0
        size = self.plan.batch_size_at(t)
        if size < self.world_size:
            raise ValueError(
                f"global batch size {size} at t={t} samples is smaller than world_size={self.world_size}: "
                "every rank needs at least one sample"
            )
        if size > remaining:
            return 0 if self.drop_last else remaining
        if not self.drop_last and remaining - size < self.world_size:
            return remaining  # what would be left could not give every rank a sample
        return size

    def _start(self) -> tuple[int, int, bool]:
        """(epoch, position in it, whether it is a new epoch) for an iteration starting now."""
        clock, saved = self.plan.clock, self.plan.sampler_settings
        if saved is None:
            return clock.epoch, 0, True
        if self._global_size(clock.samples, clock.position) == 0:
            return clock.epoch + 1, 0, True
        if saved != self.settings:
            raise ValueError(
                f"epoch {clock.epoch} is not finished ({clock.position} of its samples used); continuing it "
                f"needs the sampler settings it started with, {saved}, got {self.settings}"
            )
        return clock.epoch, clock.position, False

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position, new = self._start()
        plan = self.plan
        if new:
            plan.clock.start_epoch(epoch)
            plan.sampler_settings = self.settings
        plan.drawn.clear()  # batches drawn by an abandoned iteration were never trained
        order = self.order(epoch)
        t = plan.clock.samples
        while size := self._global_size(t, position):
            share, extra = divmod(size, self.world_size)
            lo = position + self.rank * share + min(self.rank, extra)
            plan.drawn.append(size)
            yield order[lo : lo + share + (self.rank < extra)].tolist()
            position += size
            t += size

    def __len__(self) -> int:
        """Batches an iteration starting now would yield (for ``NoiseScaleBatch``: at today's estimate)."""
        _, position, _ = self._start()
        t, count = self.plan.clock.samples, 0
        while size := self._global_size(t, position):
            position += size
            t += size
            count += 1
        return count
