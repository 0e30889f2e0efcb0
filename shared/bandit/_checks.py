"""Checks of untrusted numbers and arrays (persisted state, profiles), raising the caller's error type."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import BanditError


def finite_array(name: str, value: Any, shape: tuple[int, ...], error: type[BanditError] = BanditError) -> np.ndarray:
    """``value`` (nested lists) as a float64 array of exactly ``shape`` with finite entries."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise error(f"{name}: not an array of numbers ({exc})") from None
    if array.shape != shape:
        raise error(f"{name}: shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)):
        raise error(f"{name}: holds non-finite numbers")
    return array


def finite_number(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
                  error: type[BanditError] = BanditError) -> float:
    """``value`` as a float, if it is a real number (not a bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}: expected a number, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and lo <= number <= hi):
        raise error(f"{name}: expected a finite number in [{lo:g}, {hi:g}], got {value!r}")
    return number


def integer(name: str, value: Any, lo: int, hi: int, error: type[BanditError] = BanditError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise error(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value
