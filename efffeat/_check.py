"""Argument checks shared by the public functions: one place for each kind of value, one message style."""

from __future__ import annotations

import math
import operator
from typing import Any

from .errors import ConfigError


def integer(name: str, value: Any, minimum: int = 1, error: type[Exception] = ConfigError) -> int:
    """`value` as an ``int`` ≥ `minimum` (Python or numpy integers; ``bool`` is refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or out < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise error(f"{name} must be {kind}, got {value!r}")
    return out


def positive_int(name: str, value: Any, error: type[Exception] = ConfigError) -> int:
    """`value` as an ``int`` ≥ 1."""
    return integer(name, value, 1, error)


def real(name: str, value: Any, minimum: float | None = None, strict: bool = False) -> float:
    """`value` as a finite ``float`` (above `minimum`; strictly when `strict`)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        sign = ("positive " if strict else "non-negative ") if minimum == 0 else ""
        bound = "" if minimum in (None, 0) else f" {'>' if strict else '≥'} {minimum:g}"
        raise ConfigError(f"{name} must be a {sign}finite number{bound}, got {value!r}")
    return float(value)


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(repr(c) for c in choices)}")
    return value
