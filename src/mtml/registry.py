"""Explicit name → factory registries.

A :class:`Registry` maps names to factories (classes or functions). Subpackages fill their own registry in their
``__init__``; an unknown name raises :class:`~mtml.errors.UnknownNameError` listing the valid names and suggesting
the nearest one. This module imports nothing from mtml but its errors, so every layer may use it.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from mtml.errors import ConfigError, UnknownNameError

T = TypeVar("T")

__all__ = ["Registry", "check_options"]


def check_options(factory: Callable[..., Any], options: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Raise :class:`ConfigError` if ``options`` holds a keyword ``factory`` does not accept, lacks a required
    keyword-only one, or gives a value that does not fit its parameter's annotation; returns the options as the
    annotations read them (a list for a ``tuple`` → a tuple, an int for a ``float`` → a float).

    ``where`` names the config path for the message (for example ``training.weighting``).
    """
    sig = inspect.signature(factory)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
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
    return _check_types(factory, options, where)


def _adapters(factory: Callable[..., Any]) -> dict[str, Any]:
    """Parameter name → a pydantic ``TypeAdapter`` of its annotation, for the annotations pydantic understands
    (others — tensors, modules, callables — are left to the factory)."""
    key = getattr(factory, "__init__", factory) if inspect.isclass(factory) else factory
    cached = _ADAPTERS.get(key)
    if cached is not None:
        return cached
    from pydantic import ConfigDict, TypeAdapter  # (pydantic is a dependency; imported late: this module is light)

    try:
        hints = typing.get_type_hints(key)
    except Exception:  # one annotation does not resolve: take the others one by one
        hints = {}
        namespace = getattr(key, "__globals__", {})
        for name, text in getattr(key, "__annotations__", {}).items():
            try:
                hints[name] = eval(text, namespace) if isinstance(text, str) else text
            except Exception:  # unresolvable: left to the factory
                continue
    out: dict[str, Any] = {}
    for name, hint in hints.items():
        if name == "return" or hint is Any:
            continue
        try:
            out[name] = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=False))
        except Exception:  # pydantic cannot build a schema for it
            continue
    _ADAPTERS[key] = out
    return out


_ADAPTERS: dict[Any, dict[str, Any]] = {}


def _check_types(factory: Callable[..., Any], options: dict[str, Any], where: str) -> dict[str, Any]:
    """Raise :class:`ConfigError` for an option whose value does not fit its parameter's annotation (``null``
    for a number, a word for a list, …), instead of a ``TypeError`` deep inside the factory; the options as
    the annotations read them."""
    from pydantic import ValidationError

    adapters = _adapters(factory)
    out = dict(options)
    for key, value in options.items():
        adapter = adapters.get(key)
        if adapter is None:
            continue
        try:
            read = adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first.get("type") == "sequence_str":  # pydantic's words for a string given where a list goes
                raise ConfigError(f"{where}: `{key}` must be a list ({_show(adapter)}), not one string: write "
                                  f"[{value}]. Got {value!r}.") from None
            want = str(first.get("msg", "")).removeprefix("Input should be ").split(", ")[0]
            raise ConfigError(f"{where}: `{key}` must be {want} ({_show(adapter)}). Got {value!r}.") from None
        except Exception:  # a validator that cannot judge this value: left to the factory
            continue
        # pydantic's lax mode reads "yes" as True, "3" as 3 and true as 1.0: a word where a number or a flag goes,
        # a number where a flag goes, or a flag where a number goes is a mistake
        if (isinstance(value, str) and isinstance(read, (bool, int, float))) or (
                isinstance(read, bool) and not isinstance(value, bool)) or (
                isinstance(value, bool) and not isinstance(read, bool) and isinstance(read, (int, float))):
            raise ConfigError(f"{where}: `{key}` must be {_show(adapter)}, written as such (true/false, 3, "
                              f"0.5). Got {value!r}.")
        out[key] = read
    return out


def _show(adapter: Any) -> str:
    """The annotation as a user reads it: ``int | None``, ``Sequence[int]``."""
    text = str(getattr(adapter, "_type", "")).replace("typing.", "").replace("collections.abc.", "")
    return text.replace("<class '", "").replace("'>", "") or "see the option's documentation"


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
        options = check_options(factory, options, where=where or f"{self.kind} '{name}'")
        try:
            return factory(*args, **options)
        except ConfigError as exc:
            if where is None or str(exc).startswith(where):
                raise
            raise type(exc)(f"{where}: {exc}") from None
