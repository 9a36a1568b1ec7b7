"""Validation helpers shared by constructors across the packages: a bad number becomes one :class:`ConfigError`
that names the value and the fix."""

from __future__ import annotations

from mtml.errors import ConfigError

__all__ = ["check_int", "check_nonnegative", "check_positive"]


def check_positive(name: str, value: float, fix: str) -> float:
    """``value`` as a float if it is a finite number > 0, else :class:`ConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ConfigError(f"`{name}` must be a finite number > 0. Got {value!r}. {fix}")
    return float(value)


def check_int(name: str, value: int, minimum: int, fix: str) -> int:
    """``value`` if it is an int ≥ ``minimum``, else :class:`ConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}. Got {value!r}. {fix}")
    return value


def check_nonnegative(name: str, value: float, fix: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0, else :class:`ConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ConfigError(f"`{name}` must be a finite number >= 0. Got {value!r}.{' ' + fix if fix else ''}")
    return float(value)
