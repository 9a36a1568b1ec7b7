"""The operating system says no: full disks, unwritable places, files where directories go — one line, no traceback,
and the saved work kept (issue 17's *OS errors as tracebacks* class).

The full-disk test mounts a small tmpfs (root only; skipped where mounting is not allowed), fills it with a
training run, then grows it and runs the same command again: the run must finish from its last checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mtml.cli._app import os_message

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENV.pop("MTML_TRACEBACK", None)
CONFIG = {
    "name": "hostile-os",
    "seed": 0,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 2, "n_train": 40,
                                                 "n_val": 20, "n_test": 20}},
    "model": {"trunk_hidden": [64, 64]},
    "training": {"lr": 0.01, "batch_size": 10, "max_steps": 200, "eval_every": 10, "checkpoint_every": 10,
                 "patience": 0},
}


def mtml(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    return path


def test_an_out_where_nothing_can_be_created_is_one_line(config: Path) -> None:
    # /proc refuses new entries even to root (chmod-based tests cannot: root ignores permissions)
    proc = mtml("train", config, "--out", "/proc/mtml-no-such-run", "--quiet")
    line = one_line_failure(proc, "/proc/mtml-no-such-run", "MTML_TRACEBACK=1")
    assert line.startswith("error:")


def test_mtml_traceback_shows_the_traceback_instead(config: Path) -> None:
    proc = mtml("train", config, "--out", "/proc/mtml-no-such-run", "--quiet", env={**ENV, "MTML_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_a_file_where_the_cache_directory_goes_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    proc = mtml("eval", tmp_path / "missing-run", env={**ENV, "MTML_CACHE": str(blocker / "sub")})
    # (a missing run is mtml's own error; the point: whatever reaches the user is one line)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("code", "hint"), [
    (errno.ENOSPC, "free space"), (errno.EROFS, "writable"), (errno.EACCES, "permissions"),
    (errno.EISDIR, "not a directory's"), (errno.EMFILE, "ulimit"),
])
def test_os_messages_name_the_file_and_the_fix(code: int, hint: str) -> None:
    message = os_message(OSError(code, os.strerror(code), "/data/run/metrics.jsonl"))
    assert os.strerror(code) in message and "/data/run/metrics.jsonl" in message and hint in message
    assert "\n" not in message


def test_decoding_and_memory_errors_have_their_own_lines() -> None:
    assert "UTF-8" in os_message(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert "smaller" in os_message(MemoryError())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB tmpfs: room for the config and the first checkpoints of CONFIG's model, not for the run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_same_command_finishes_once_there_is_room(config: Path,
                                                                                 small_disk: Path) -> None:
    out = small_disk / "run"
    proc = mtml("train", config, "--out", out, "--quiet")
    one_line_failure(proc, os.strerror(errno.ENOSPC), "free space")
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*.safetensors"))
    assert kept, "the checkpoints written before the disk filled are kept"
    subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", str(small_disk)], check=True)
    again = mtml("train", config, "--out", out, "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "summary.json").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
