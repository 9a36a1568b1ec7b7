"""Explicit name → factory registries.

A :class:`Registry` maps names to factories (classes or functions). Subpackages fill their own registry in their
``__init__``; an unknown name raises :class:`~mtml.errors.UnknownNameError` listing the valid names and suggesting
the nearest one. This module imports nothing from mtml but its errors, so every layer may use it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from mtml.errors import ConfigError, UnknownNameError

T = TypeVar("T")

__all__ = ["Registry", "check_options"]


def check_options(factory: Callable[..., Any], options: dict[str, Any], *, where: str) -> None:
    """Raise :class:`ConfigError` if ``options`` holds a keyword ``factory`` does not accept, or lacks a required
    keyword-only one.

    ``where`` names the config path for the message (for example ``training.weighting``).
    """
    sig = inspect.signature(factory)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    # positional-only parameters are filled by the caller (a weighting's task names), never by options
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
    allowed = [n for n, p in params.items() if p.kind not in skip]
    for key in options:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            shown = ", ".join(allowed) if allowed else "(none)"
            raise ConfigError(f"{where}: unknown option '{key}'. Allowed options: {shown}.{hint}")
    required = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                and p.default is inspect.Parameter.empty and n not in options]
    if required:  # otherwise a TypeError (and a traceback) when the factory is called
        raise ConfigError(f"{where}: missing required option{'s' if len(required) > 1 else ''} "
                          f"{', '.join(repr(n) for n in required)}.")


class Registry(Generic[T]):
    """A named collection of factories producing ``T``.

    Example::

        WEIGHTINGS = Registry("weighting")
        WEIGHTINGS.register("equal", Equal, help="Σ L_i")
        WEIGHTINGS.create("equal", ["a", "b"])
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, factory: Callable[..., T], *, help: str = "") -> Callable[..., T]:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = factory
        doc = help or (inspect.getdoc(factory) or "").split("\n")[0]
        self._help[name] = doc
        return factory

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """Name → one-line description, sorted by name."""
        return {n: self._help[n] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            near = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{hint} Valid {self.kind} names: {', '.join(self.names())}."
            ) from None

    def create(self, name: str, /, *args: Any, where: str | None = None, **options: Any) -> T:
        """Build ``name`` with ``options``.

        Bad option names raise :class:`ConfigError` naming ``where``; a :class:`ConfigError` the factory raises for
        a bad option value is prefixed with ``where`` too, so the message leads with the config key to fix.
        """
        factory = self.get(name)
        check_options(factory, options, where=where or f"{self.kind} '{name}'")
        try:
            return factory(*args, **options)
        except ConfigError as exc:
            if where is None or str(exc).startswith(where):
                raise
            raise type(exc)(f"{where}: {exc}") from None
