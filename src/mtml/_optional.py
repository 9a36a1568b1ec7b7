"""Optional dependencies: import one, or say in one line which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from mtml.errors import ConfigError

__all__ = ["require"]


def require(module: str, user: str, extra: str = "data") -> ModuleType:
    """Import ``module`` for ``user`` (e.g. ``"dataset 'texts'"``) or raise a :class:`ConfigError` naming the
    extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{user} needs the Python package '{module}'; install the {extra} extra: "
                          f"pip install 'mtml[{extra}]'") from None
