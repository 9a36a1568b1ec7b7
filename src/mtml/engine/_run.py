"""A run directory: resolved config, metrics log, checkpoints, summary and plots.

Layout::

    RUN/
      config.yaml        resolved configuration (written once)
      run.json           status: running | interrupted | failed | diverged | completed, mtml version, times
      metrics.jsonl      append-only log, one JSON record a line
      checkpoints/       step-00000100.safetensors …, best.safetensors
      summary.json       per-task test metrics of the restored best model
      plots/             learning curves (PNG)
      tensorboard/       event files (with ``logging.tensorboard``)

Every file except ``metrics.jsonl`` is written atomically; the log is appended and fsynced line by line.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

from mtml._version import __version__
from mtml._yaml import load_yaml
from mtml.atomic import append_jsonl, atomic_write_text, is_free_dir, temporaries
from mtml.errors import CheckpointError, ConfigError, RunExistsError

__all__ = ["Run"]

_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")
_LOCK = ".lock"
#: the lock files this process holds, by resolved run path (file descriptors; closing one releases it)
_HELD: dict[str, int] = {}


class Run:
    """Owns one run directory. Use :meth:`create` for a new run and :meth:`open` for an existing one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._sinks: list[Callable[[dict[str, Any]], None]] = []

    def attach(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Also hand every record :meth:`log` writes to ``sink`` (TensorBoard, MLflow); the log stays the record."""
        self._sinks.append(sink)

    def detach(self, sink: Callable[[dict[str, Any]], None]) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    # -- creation ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> Run:
        """Make a new run directory; an existing non-empty directory raises :class:`RunExistsError`."""
        path = Path(path)
        cls.check_new(path)
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (path / "plots").mkdir(exist_ok=True)
        run = cls(path)
        run.lock()
        atomic_write_text(path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        run.set_status("running", started=time.time())
        return run

    @staticmethod
    def check_new(path: str | Path) -> None:
        """:class:`RunExistsError` unless ``path`` is free for a new run (absent, or an empty directory)."""
        if not is_free_dir(path):
            raise RunExistsError(
                f"run directory {path} already exists and is not empty; refusing to overwrite it. Choose "
                f"another --out, or continue it with --resume {path}."
            )

    @classmethod
    def reopen(cls, path: str | Path, config: dict[str, Any]) -> Run | None:
        """The unfinished run at ``path`` that ``config`` continues, or ``None`` when ``path`` is free for a new
        run (what ``mtml train CONFIG --out PATH`` does by itself, and what a restarted torchrun group needs).

        Continued: a run directory written by the same resolved config whose status is not ``completed``
        (``running`` after a crash or kill, ``interrupted``). Refused with :class:`RunExistsError` naming why:
        a directory that is not a run, a completed or diverged run, or a different config (the keys that
        differ are listed).
        """
        path = Path(path)
        if is_free_dir(path):
            return None
        if not path.is_dir() or not (path / "config.yaml").is_file():
            raise RunExistsError(f"{path} already exists and is not an mtml run directory (no config.yaml); "
                                 "refusing to write into it. Choose another --out.")
        run = cls(path)
        run.check_unlocked()
        status = run.status().get("status")
        if status == "completed":
            raise RunExistsError(f"run directory {path} already exists and its run has completed; refusing to "
                                 f"overwrite it. Choose another --out (see its results with `mtml eval {path}`).")
        if status == "diverged":
            raise RunExistsError(f"run directory {path} already exists and its run diverged; the same config would "
                                 "diverge again. Choose another --out (and a lower training.lr).")
        ours = yaml.safe_load(yaml.safe_dump(config, sort_keys=False)) or {}
        changed = config_changes(run.config(), ours)
        if changed:
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise RunExistsError(f"run directory {path} already exists with a different config ({shown}); "
                                 f"refusing to continue it with this one. Choose another --out, or continue it "
                                 f"unchanged with --resume {path}.")
        return run

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run; raises :class:`CheckpointError` if ``path`` is not a run directory."""
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"{path} is not an mtml run directory (no config.yaml). Give the folder that "
                                  "`mtml train` created.")
        return cls(path)

    # -- one trainer at a time ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run's lock file until :meth:`unlock` or the end of this process (the kernel releases it
        then, even after SIGKILL, so a crashed run is never left locked); :class:`RunExistsError` when another
        process holds it. Without ``fcntl`` (not POSIX) runs are not locked."""
        key = str(self.path.resolve())
        if key in _HELD or fcntl is None:
            return
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._take(fd)
        except RunExistsError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[key] = fd

    def unlock(self) -> None:
        fd = _HELD.pop(str(self.path.resolve()), None)
        if fd is not None:
            os.close(fd)

    def check_unlocked(self) -> None:
        """:class:`RunExistsError` when another process trains this run right now (the lock is not kept)."""
        if str(self.path.resolve()) in _HELD or fcntl is None or not (self.path / _LOCK).exists():
            return
        fd = os.open(self.path / _LOCK, os.O_RDONLY)
        try:
            self._take(fd)
        finally:
            os.close(fd)  # (closing releases a lock this probe took)

    def _take(self, fd: int) -> None:
        """Lock ``fd`` (the run's open lock file) without waiting; :class:`RunExistsError` naming the pid
        written in it when another process holds the lock."""
        assert fcntl is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunExistsError(f"run directory {self.path} is being trained by another process (pid {holder}); "
                                 "refusing to write into it at the same time. Wait for it to stop, or choose "
                                 "another --out.") from None

    def sweep_temporaries(self, older_than_s: float = 60.0) -> list[Path]:
        """Delete the temporary files an interrupted atomic write left (``.NAME.*.tmp`` in the run and its
        checkpoint folder) that are older than ``older_than_s`` seconds → the paths removed. Called on resume;
        younger files may belong to a writer that is still running."""
        now, removed = time.time(), []
        for folder in (self.path, self.checkpoint_dir):
            for tmp in temporaries(folder):
                try:
                    if now - tmp.stat().st_mtime >= older_than_s:
                        tmp.unlink()
                        removed.append(tmp)
                except OSError:
                    continue
        return removed

    # -- files ------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plot_dir(self) -> Path:
        d = self.path / "plots"
        d.mkdir(exist_ok=True)
        return d

    def config(self) -> dict[str, Any]:
        try:
            data = load_yaml((self.path / "config.yaml").read_text(encoding="utf-8"), str(self.path / "config.yaml"))
        except (ConfigError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path / 'config.yaml'} cannot be read back: {exc}") from None
        return dict(data or {})

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.path / "run.json").read_text()))
        except (OSError, json.JSONDecodeError):
            return {}

    def set_status(self, status: str, **extra: Any) -> None:
        info = {**self.status(), "status": status, "mtml_version": __version__, **extra}
        atomic_write_text(self.path / "run.json", json.dumps(info, indent=2))

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / "metrics.jsonl", record)
        for sink in self._sinks:
            sink(record)

    def records(self) -> Iterator[dict[str, Any]]:
        """Records of ``metrics.jsonl``; a torn last line (from a crash) is skipped."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))

    def summary(self) -> dict[str, Any]:
        path = self.path / "summary.json"
        if not path.exists():
            raise CheckpointError(f"{self.path} has no summary.json: the run has not finished. Resume it with "
                                  f"`mtml train --resume {self.path}`.")
        return dict(json.loads(path.read_text()))

    # -- checkpoints ------------------------------------------------------------------------------------
    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoint_dir / f"step-{step:08d}.safetensors"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.safetensors"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every step checkpoint, oldest first."""
        found = []
        if self.checkpoint_dir.is_dir():
            for p in self.checkpoint_dir.iterdir():
                m = _STEP_FILE.match(p.name)
                if m:
                    found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` step checkpoints (``best`` is never deleted)."""
        for _, path in self.checkpoints()[:-keep] if keep > 0 else []:
            path.unlink(missing_ok=True)


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``"key.path: old -> new"`` for every value that differs between two config dicts (nested dicts are
    compared key by key; lists and scalars as wholes)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                out.append(f"{name}: {old[key]!r} -> (unset)")
            elif key not in old:
                out.append(f"{name}: (unset) -> {new[key]!r}")
            else:
                out.extend(config_changes(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix or '(config)'}: {old!r} -> {new!r}"]
