"""Error measures and the tolerance check every path passes before it is timed."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def max_abs_err(got: Tensor, want: Tensor) -> float:
    """max|got - want| in float64; inf when shapes differ or a NaN appears anywhere: NaN never passes."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    diff = (got.detach().to(want.device).double() - want.detach().double()).abs_()
    return math.inf if diff.isnan().any() else diff.max().item()


def max_rel_err(got: Tensor, want: Tensor) -> float:
    """max|got - want| / max|want| (the absolute error when want is all zero); inf as max_abs_err."""
    err = max_abs_err(got, want)
    scale = want.detach().double().abs().max().item() if want.numel() else 0.0
    return err / scale if scale > 0 and math.isfinite(err) else err


def l2_rel_err(got: Tensor, want: Tensor) -> float:
    """‖got - want‖ / ‖want‖ in float64; inf on shape mismatch or NaN.

    Used where a few elements may legitimately flip sides of ReLU's kink under rounding (a max-based
    error would then measure the flip, not the kernel)."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    want64 = want.detach().double()
    err = (got.detach().to(want64.device).double() - want64).norm().item()
    if math.isnan(err):
        return math.inf
    scale = want64.norm().item()
    return err / scale if scale > 0 else err


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def failures(errors: Mapping[str, float], bounds: Mapping[str, float]) -> str | None:
    """None if every error is within its bound (NaN never is), else how many are not and the worst."""
    bad = {k: e for k, e in errors.items() if not e <= bounds[k]}
    if not bad:
        return None
    worst = max(bad, key=lambda k: bad[k] / bounds[k] if bounds[k] > 0 else math.inf)
    return (
        f"{len(bad)} of {len(errors)} outputs differ from the reference; worst {worst}: "
        f"error {bad[worst]:.3g} > tolerance {bounds[worst]:.3g}"
    )
