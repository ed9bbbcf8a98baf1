"""Loss-driven LR schedules: their value is state that ``observe(loss)`` updates, whatever ``t`` is.

A value that cannot drive the rule (NaN or inf, or for ``LossBackoff`` a loss <= 0, where the ratio of
losses has no meaning) is skipped with a ``RuntimeWarning``, so one bad batch cannot turn the LR into
NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Literal

from . import _checks
from .base import LRSchedule

__all__ = ["LossBackoff", "Plateau"]


def _skip(schedule: LRSchedule, value: float, why: str) -> None:
    warnings.warn(
        f"{type(schedule).__name__}.observe: ignored {value!r} ({why}); the LR stays {schedule(0)!r}",
        RuntimeWarning,
        stacklevel=5,  # the caller of Plan.observe or Schedule.observe
    )


class LossBackoff(LRSchedule):
    """``lr <- lr / (1 + (loss - prev_loss) / prev_loss)`` on each ``observe(loss)``, within [min_lr, max_lr].

    The LR falls when the loss rises and rises when it falls, by the loss's relative change. The first
    observed loss only sets ``prev_loss``. Losses that are NaN, infinite or <= 0 are ignored (with a
    warning) and do not become ``prev_loss``.
    """

    stateful: ClassVar[bool] = True

    def __init__(self, base: float, min_lr: float = 0.0, max_lr: float | None = None) -> None:
        self.base = _checks.non_negative("base", base)
        self.min_lr = _checks.non_negative("min_lr", min_lr)
        self.max_lr = None if max_lr is None else _checks.non_negative("max_lr", max_lr)
        if self.max_lr is not None and self.max_lr < self.min_lr:
            raise ValueError(f"max_lr must be >= min_lr, got max_lr={max_lr!r} < min_lr={min_lr!r}")
        self.lr = self._clamp(self.base)
        self.prev_loss: float | None = None

    def _clamp(self, lr: float) -> float:
        lr = max(lr, self.min_lr)
        return lr if self.max_lr is None else min(lr, self.max_lr)

    def _at(self, t: float) -> float:
        return self.lr

    def _observe(self, loss: float) -> None:
        if not math.isfinite(loss) or loss <= 0:
            _skip(self, loss, "a loss must be finite and > 0")
            return
        if self.prev_loss is not None:
            # 1 + (loss - prev) / prev is loss / prev; the ratio form cannot cancel to 0 for a tiny loss.
            lr = self.lr * (self.prev_loss / loss)
            if not math.isfinite(lr):
                _skip(self, loss, f"the LR would become {lr!r}")
                return
            self.lr = self._clamp(lr)
        self.prev_loss = loss

    def _state(self) -> dict[str, Any]:
        return {"lr": self.lr, "prev_loss": self.prev_loss}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.lr, self.prev_loss = float(state["lr"]), state["prev_loss"]


class Plateau(LRSchedule):
    """``ReduceLROnPlateau``'s rule (torch.optim.lr_scheduler): one ``observe(metric)`` per torch ``step``.

    The LR starts at ``base``. A metric better than ``best`` by more than ``threshold`` (relative in
    ``threshold_mode="rel"``, absolute in ``"abs"``; lower is better in ``mode="min"``) becomes the new
    best; after more than ``patience`` observations in a row without one, the LR is multiplied by
    ``factor`` (not below ``min_lr``; a change smaller than ``eps`` is skipped) and the next
    ``cooldown`` observations do not count. Any finite metric is used as torch would (a negative one
    too); NaN and inf are ignored with a warning, where torch would count them as "not better".
    """

    stateful: ClassVar[bool] = True

    def __init__(
        self,
        base: float,
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        min_lr: float = 0.0,
        *,
        mode: Literal["min", "max"] = "min",
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        eps: float = 1e-8,
    ) -> None:
        self.base = _checks.non_negative("base", base)
        self.factor = _checks.in_range("factor", factor, 0.0, 1.0, high_open=True)
        self.patience = _checks.integer("patience", patience, low=0)
        self.threshold = _checks.non_negative("threshold", threshold)
        self.min_lr = _checks.non_negative("min_lr", min_lr)
        self.mode = _checks.choice("mode", mode, ("min", "max"))
        self.threshold_mode = _checks.choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.cooldown = _checks.integer("cooldown", cooldown, low=0)
        self.eps = _checks.non_negative("eps", eps)
        self.lr = self.base
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_left = 0

    def _at(self, t: float) -> float:
        return self.lr

    def _is_better(self, metric: float) -> bool:
        sign = 1.0 if self.mode == "min" else -1.0
        if self.threshold_mode == "rel":
            return sign * metric < sign * self.best * (1.0 - sign * self.threshold)
        return sign * metric < sign * self.best - self.threshold

    def _observe(self, metric: float) -> None:
        if not math.isfinite(metric):
            _skip(self, metric, "a metric must be finite")
            return
        if self._is_better(metric):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0  # bad observations during cooldown do not count
        if self.num_bad > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_left, self.num_bad = self.cooldown, 0

    def _state(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_left": self.cooldown_left,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.num_bad, self.cooldown_left = int(state["num_bad"]), int(state["cooldown_left"])
