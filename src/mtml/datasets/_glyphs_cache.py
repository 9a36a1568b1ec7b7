"""On-disk cache of rendered ``glyphs`` datasets: ``<root>/glyphs/<key>/{glyphs.safetensors, meta.json}``.

The root is the ``cache_dir`` option, else ``$MTML_CACHE``, else ``~/.cache/mtml``. The key is a hash of the
format version and every option that changes the pixels (seed, sizes, augmentation, the font files, Pillow's
and Unicode's versions), so a changed option never reads a stale set. Both files are written atomically
(temporary file, then rename; the meta file last, so its presence marks a complete entry) and ``meta.json``
holds the SHA-256 of the tensor file: a truncated or altered entry is detected, reported with a warning and
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

from mtml.atomic import atomic_write_bytes

__all__ = ["GlyphsCacheWarning", "cache_dir_for", "cache_key", "read_entry", "write_entry"]

CACHE_ENV = "MTML_CACHE"
_TENSORS = "glyphs.safetensors"
_META = "meta.json"


class GlyphsCacheWarning(UserWarning):
    """A cached glyphs entry was unreadable or corrupt and is being rebuilt."""


def cache_key(options: dict[str, Any]) -> str:
    """A short stable hash of ``options`` (JSON-serialisable)."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(key: str, root: str | os.PathLike[str] | None) -> Path:
    base = Path(root) if root is not None else Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mtml"))
    return base.expanduser() / "glyphs" / key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_entry(directory: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Store ``tensors`` (contiguous CPU tensors) and ``meta`` (JSON) as one cache entry."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(directory / _TENSORS, blob)
    record = {**meta, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    atomic_write_bytes(directory / _META, json.dumps(record, indent=1, ensure_ascii=False).encode())


def _corrupt(directory: Path, reason: str) -> None:
    warnings.warn(f"glyphs: cache entry {directory} is corrupt ({reason}); rendering it again.",
                  GlyphsCacheWarning, stacklevel=3)


def read_entry(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The cached tensors and meta, or ``None`` if there is no complete entry; a corrupt entry warns
    (:class:`GlyphsCacheWarning`) and also gives ``None``."""
    from safetensors.torch import load_file

    meta_path, tensor_path = directory / _META, directory / _TENSORS
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _corrupt(directory, f"unreadable {_META}: {exc}")
        return None
    if not isinstance(meta, dict) or not tensor_path.exists():
        _corrupt(directory, f"{_TENSORS} is missing" if isinstance(meta, dict) else f"{_META} is not an object")
        return None
    if tensor_path.stat().st_size != meta.get("bytes") or _sha256(tensor_path) != meta.get("sha256"):
        _corrupt(directory, f"{_TENSORS} does not match the checksum in {_META}")
        return None
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own error types on malformed headers
        _corrupt(directory, f"cannot read {_TENSORS}: {exc}")
        return None
    return tensors, meta
