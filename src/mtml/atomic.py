"""Crash-safe file writes: write a temporary file beside the target, fsync, then rename over it.

Dependency-free, so every layer (data caches, engine runs and checkpoints, outer reports) uses the same writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "atomic_write_bytes", "atomic_write_text", "temporaries"]


_TEMP_SUFFIX = ".tmp"


def temporaries(folder: str | Path) -> list[Path]:
    """The temporary files (``.NAME.*.tmp``) that :func:`atomic_write_bytes` calls killed mid-write left in
    ``folder``."""
    return sorted(Path(folder).glob(f".*{_TEMP_SUFFIX}"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees either the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def is_free_dir(path: str | Path) -> bool:
    """Whether ``path`` can take new results: it does not exist, or is an empty directory."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most the line being written).

    A torn last line left by such a crash (no final newline) is cut off first, so that it cannot swallow the
    record appended after it.
    """
    line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
    _cut_torn_line(Path(path))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _cut_torn_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate ``path`` after its last newline when it does not end with one."""
    try:
        fh = open(path, "r+b")  # noqa: SIM115 (closed below; a missing file is simply a new log)
    except FileNotFoundError:
        return
    with fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            cut = fh.read(pos - start).rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            pos = start
        fh.truncate(0)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
