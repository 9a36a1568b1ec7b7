"""The one YAML reader of mtml: safe, YAML 1.2 numbers, duplicate keys refused.

PyYAML follows YAML 1.1, which reads ``3e-4`` and ``1e-4`` (no dot) as strings, so ``lr: 3e-4`` failed
validation as "not a valid number"; YAML 1.2 (and every other tool a user has) reads them as floats. A key given
twice in one mapping (a second ``training:`` section) silently replaced the first; here it is an error that
names the key and both lines.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode

from mtml.errors import ConfigError

__all__ = ["load_yaml"]

_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats and a check for duplicate keys."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _mapping(loader: _Loader, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the constructor report it
            continue
        if first is not None:
            raise ConstructorError(None, None, f"key {key!r} is given twice (first on line {first + 1}); keep "
                                   "one of them", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return SafeConstructor.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text`` (from ``source``, named in errors) → Python values; :class:`ConfigError` if it is not valid
    YAML or repeats a key."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        # PyYAML names the text "<unicode string>" and adds the offending line: put the file's name there, on one line
        detail = " ".join(str(exc).replace('"<unicode string>"', source).split()).rstrip(" ^")
        raise ConfigError(f"{source} is not valid YAML: {detail}") from None
