"""Exceptions raised by mtml.

Every error mtml raises on bad input derives from :class:`MtmlError`, and its message names the offending
value, the rule it broke and how to fix it. The CLI prints these messages without a traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergedError",
    "MtmlError",
    "RunExistsError",
    "ShapeError",
    "UnknownNameError",
]


class MtmlError(Exception):
    """Base class of every error mtml raises on purpose."""


class ConfigError(MtmlError, ValueError):
    """A configuration value is missing, misspelt, of the wrong type or out of range."""


class UnknownNameError(ConfigError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataError(MtmlError, ValueError):
    """Task data is malformed: wrong shapes, labels out of range, NaN or inf values."""


class ShapeError(DataError):
    """A tensor does not have the shape the model or task expects."""


class CheckpointError(MtmlError):
    """A checkpoint or run directory is missing, truncated or corrupt."""


class RunExistsError(MtmlError, FileExistsError):
    """Refusing to overwrite an existing run directory."""


class DivergedError(MtmlError, FloatingPointError):
    """Training produced a non-finite loss or validation objective."""
