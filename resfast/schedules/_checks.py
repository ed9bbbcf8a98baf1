"""Argument checks shared by every schedule: one wording for every error, naming the value and the rule."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import TypeVar

T = TypeVar("T")


def real(name: str, value: object) -> float:
    """A finite real number (bool excluded: ``True`` as an LR is a bug, not a 1)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def integer(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def positive(name: str, value: object) -> float:
    v = real(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def non_negative(name: str, value: object) -> float:
    v = real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def in_range(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> float:
    """``low <= value <= high`` (``< high`` when ``high_open``)."""
    v = real(name, value)
    if v < low or v > high or (high_open and v == high):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def choice(name: str, value: object, allowed: tuple[object, ...]) -> object:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def instance(name: str, value: object, cls: type[T], what: str) -> T:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}")
    return value
