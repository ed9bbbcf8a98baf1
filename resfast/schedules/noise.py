"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training") and
an adaptive batch size that follows it.

A gradient averaged over ``B`` samples, ``G_B``, has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B`` (``G`` the true
gradient, ``Sigma`` the per-sample gradient covariance). Measuring ``|G_B|^2`` at two batch sizes
``b < B`` gives unbiased estimates of both terms (their appendix A.1)::

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each estimate is very noisy, and their ratio is biased, so the two are averaged separately (exponential
moving averages) and ``B_noise = tr(Sigma) / |G|^2`` (samples) is the ratio of the averages. ``B_noise``
approximates the critical batch size: above it, a larger batch stops buying fewer steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from . import _checks
from .base import BatchSchedule
from .batch import round_size

__all__ = ["GradientNoiseScale", "NoiseScaleBatch"]


class GradientNoiseScale:
    """Running estimate of ``B_noise`` (samples) from squared gradient norms at two batch sizes.

    ``beta`` is the EMA decay per update (``0`` keeps only the latest pair). Two ways to feed it:

    - ``update(sq_norm_small, batch_small, sq_norm_big, batch_big)`` with norms you computed;
    - ``measure(model, batch_size)`` twice per step, reading ``sum(|p.grad|^2)`` from the model: e.g.
      with gradient accumulation over ``k`` micro-batches of ``b`` samples and the loss divided by ``k``,
      once after the first backward (``batch_size=b, grad_scale=k``) and once after the last
      (``batch_size=k*b``). Under DDP, take the small one inside ``model.no_sync()`` (the rank's local
      gradient) and average it over ranks (one scalar all-reduce) before ``update``, so every rank
      holds the same estimate; the big one is the all-reduced gradient.

    Cost: each measurement reads every gradient once (one fused norm, ``torch.nn.utils.get_total_norm``)
    and synchronises with the device once to get the number. With accumulation the two batch sizes
    come for free; without it, the small norm needs gradients of part of a batch. Measure every few
    steps where the sync shows.
    """

    def __init__(self, beta: float = 0.99) -> None:
        self.beta = _checks.in_range("beta", beta, 0.0, 1.0, high_open=True)
        self.count = 0
        self.ema_grad_sq = 0.0
        self.ema_trace = 0.0
        self._pending: tuple[float, int] | None = None

    def update(
        self, sq_norm_small: float, batch_small: int, sq_norm_big: float, batch_big: int
    ) -> float | None:
        """Fold in one pair of squared gradient norms; ``batch_*`` are the samples each gradient averages.

        Returns ``noise_scale``. A non-finite norm (an overflowed AMP step) is skipped with a warning.
        """
        batch_small = _checks.integer("batch_small", batch_small, low=1)
        batch_big = _checks.integer("batch_big", batch_big, low=1)
        if batch_big <= batch_small:
            raise ValueError(
                f"batch_big must be > batch_small, got batch_small={batch_small}, batch_big={batch_big}"
            )
        small, big = float(sq_norm_small), float(sq_norm_big)
        if not (math.isfinite(small) and math.isfinite(big)):
            warnings.warn(
                f"GradientNoiseScale.update: skipped non-finite squared norms ({small!r}, {big!r})",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.noise_scale
        if small < 0 or big < 0:
            raise ValueError(f"squared norms must be >= 0, got {small!r} and {big!r}")
        grad_sq = (batch_big * big - batch_small * small) / (batch_big - batch_small)
        trace = (small - big) * batch_small * batch_big / (batch_big - batch_small)
        self.ema_grad_sq = self.beta * self.ema_grad_sq + (1.0 - self.beta) * grad_sq
        self.ema_trace = self.beta * self.ema_trace + (1.0 - self.beta) * trace
        self.count += 1
        return self.noise_scale

    def measure(
        self, params: torch.nn.Module | Iterable[torch.Tensor], batch_size: int, *, grad_scale: float = 1.0
    ) -> float | None:
        """Read ``sum(|grad_scale * p.grad|^2)`` now, as the gradient of the mean loss over ``batch_size``
        samples; every second call (the other batch size of the pair) updates the estimate.

        ``grad_scale`` turns the stored gradients into that mean's gradient: ``k`` after the first of
        ``k`` accumulated backwards of ``loss / k``; ``1 / scaler.get_scale()`` for AMP-scaled grads
        not yet unscaled. Returns ``noise_scale``.
        """
        batch_size = _checks.integer("batch_size", batch_size, low=1)
        grad_scale = _checks.real("grad_scale", grad_scale)
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise ValueError("measure found no gradients: call it after backward()")
        sq_norm = float(torch.nn.utils.get_total_norm(grads)) ** 2 * grad_scale**2
        if self._pending is None:
            self._pending = (sq_norm, batch_size)
            return self.noise_scale
        (first, first_batch), self._pending = self._pending, None
        if first_batch == batch_size:
            raise ValueError(f"measure needs two different batch sizes per pair, got {batch_size} twice")
        pair = sorted([(first_batch, first), (batch_size, sq_norm)])
        return self.update(pair[0][1], pair[0][0], pair[1][1], pair[1][0])

    def _debias(self, ema: float) -> float:
        # The EMAs start at 0; dividing by 1 - beta^count removes that pull (as Adam does). It cancels
        # in noise_scale, and matters for the two terms read on their own.
        return ema / (1.0 - self.beta**self.count) if self.count else math.nan

    @property
    def grad_sq(self) -> float:
        """Estimate of ``|G|^2`` (NaN before the first update)."""
        return self._debias(self.ema_grad_sq)

    @property
    def trace(self) -> float:
        """Estimate of ``tr(Sigma)``, the per-sample gradient variance summed over parameters."""
        return self._debias(self.ema_trace)

    @property
    def noise_scale(self) -> float | None:
        """``B_noise = tr(Sigma) / |G|^2`` in samples; ``None`` until one update, or while the noise still
        hides the gradient (estimated ``|G|^2 <= 0``)."""
        if self.count == 0 or self.ema_grad_sq <= 0:
            return None
        return max(self.ema_trace, 0.0) / self.ema_grad_sq

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "ema_grad_sq": self.ema_grad_sq,
            "ema_trace": self.ema_trace,
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.ema_grad_sq, self.ema_trace = (
            state["count"],
            state["ema_grad_sq"],
            state["ema_trace"],
        )
        self._pending = None if state["pending"] is None else tuple(state["pending"])

    def __repr__(self) -> str:
        return f"GradientNoiseScale(beta={self.beta!r})"


class NoiseScaleBatch(BatchSchedule):
    """The batch size that follows the critical batch size: ``estimator.noise_scale`` rounded, clamped to
    ``[base_size, max_size]``; ``base_size`` until there is an estimate.

    Unlike the other batch schedules its value is the estimator's current state, not a function of
    ``t``: a batch takes the size current when the batch sampler draws it, which with a DataLoader is up
    to ``prefetch_factor * num_workers`` steps before it trains; every rank must feed its estimator the
    same numbers (see ``GradientNoiseScale``) or the ranks disagree on sizes. Its state is the
    estimator's, saved in ``state_dict``.
    """

    stateful: ClassVar[bool] = True

    def __init__(self, base_size: int, max_size: int, estimator: GradientNoiseScale) -> None:
        self.base_size = _checks.integer("base_size", base_size, low=1)
        self.max_size = _checks.integer("max_size", max_size, low=self.base_size)
        self.estimator = _checks.instance("estimator", estimator, GradientNoiseScale, "a GradientNoiseScale")

    def _at(self, t: float) -> int:
        b_noise = self.estimator.noise_scale
        if b_noise is None:
            return self.base_size
        return max(round_size(min(b_noise, self.max_size)), self.base_size)

    def _state(self) -> dict[str, Any]:
        return self.estimator.state_dict()

    def _load_state(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state)
