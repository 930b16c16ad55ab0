"""Argument checks shared by the public API: each names the argument, what it got and what it expects.

Python and numpy scalars are accepted alike (numpy registers its scalars with `numbers`); bool is not a
number here, and a string is never a flag: `train_base="False"` is an error, not True.
"""
from __future__ import annotations

import math
import numbers


def _got(val) -> str:
    return f"{val!r} ({type(val).__name__})"


def real(name: str, val, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """val as a finite float in the given range (TypeError for a non-number, ValueError out of range)."""
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_got(val)}")
    f = float(val)
    lo_ok = low is None or (f > low if low_open else f >= low)
    hi_ok = high is None or (f < high if high_open else f <= high)
    if not (math.isfinite(f) and lo_ok and hi_ok):
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f"in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{name} must be a finite number {where}, got {val!r}")
    return f


def integer(name: str, val, low: int | None = None, high: int | None = None) -> int:
    """val as an int in [low, high] (numpy integers accepted; bool and floats are not)."""
    if isinstance(val, bool) or not isinstance(val, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_got(val)}")
    i = int(val)
    if (low is not None and i < low) or (high is not None and i > high):
        rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be an int in {rng}, got {i}")
    return i


def flag(name: str, val) -> bool:
    """val as a bool: True/False (or a numpy bool); strings and numbers are refused."""
    if isinstance(val, bool) or (type(val).__module__ == "numpy" and type(val).__name__ in ("bool", "bool_")):
        return bool(val)
    raise TypeError(f"{name} must be True or False, got {_got(val)}")
