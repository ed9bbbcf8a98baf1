"""The one clock every schedule reads: samples seen."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import _checks

__all__ = ["SampleClock"]


@dataclass
class SampleClock:
    """Where training is, counted in samples.

    ``samples`` counts samples over all ranks, ``steps`` optimizer steps. ``epoch`` is the epoch the batch
    sampler is in and ``epoch_start`` the value of ``samples`` when it began, so the position inside the
    epoch, ``samples - epoch_start``, is what a resumed sampler continues from.
    """

    samples: int = 0
    steps: int = 0
    epoch: int = 0
    epoch_start: int = 0

    def advance(self, samples: int) -> None:
        """Count one optimizer step over ``samples`` samples."""
        self.samples += _checks.integer("samples in a step", samples, low=1)
        self.steps += 1

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_start = epoch, self.samples

    @property
    def position(self) -> int:
        """Samples consumed in the current epoch."""
        return self.samples - self.epoch_start

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("samples", "steps", "epoch", "epoch_start"):
            setattr(self, name, _checks.integer(f"clock {name}", state[name], low=0))
