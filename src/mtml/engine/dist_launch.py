"""``mtml train --nproc N``: start N worker processes on this machine (gloo over loopback, or one GPU each)
and watch them; when one fails, stop the others at once and say which rank failed and how.

The workers are plain ``python -m mtml train …`` processes with the environment ``torchrun`` would give
them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so a
run started here and one started by ``torchrun --nproc-per-node N -m mtml train …`` are the same run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mtml.engine.distributed import DistributedError
from mtml.errors import ConfigError

__all__ = ["free_port", "launch"]

GRACE_S = 5.0  # how long a stopped rank gets to exit after SIGTERM before SIGKILL
SETTLE_S = 0.5  # ranks that saw the failure themselves get this long to exit with their own message


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_env(rank: int, nproc: int, port: int, timeout: float | None) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if timeout is not None:
        env["MTML_DIST_TIMEOUT"] = str(timeout)
    return env


def _describe(rank: int, code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} was killed by {name}"
    if code == 2:
        return f"rank {rank} stopped with the error above"
    return f"rank {rank} exited with code {code}"


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM every rank still running after :data:`SETTLE_S`, SIGKILL those still there after
    :data:`GRACE_S`; returns the ranks it had to stop."""
    settle = time.monotonic() + SETTLE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < settle:
        time.sleep(0.05)
    stopped = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in stopped:
        procs[r].terminate()
    deadline = time.monotonic() + GRACE_S
    for r in stopped:
        try:
            procs[r].wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs[r].kill()
            procs[r].wait()
    return stopped


def _watch(procs: Sequence[subprocess.Popen[bytes]], poll_s: float = 0.05) -> tuple[list[int], list[int]]:
    """Wait for every rank; on the first failure stop the rest. Returns exit codes and the stopped ranks."""
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            stopped = _stop(procs)
            return [int(p.returncode) for p in procs], stopped
        if all(c == 0 for c in codes):
            return [0] * len(procs), []
        time.sleep(poll_s)


def launch(args: Sequence[str], nproc: int, *, run_dir: Path | str, timeout: float | None = None) -> None:
    """Run ``python -m mtml <args>`` as ``nproc`` ranks of one process group on this machine.

    Returns when every rank finished; raises :class:`DistributedError` naming the failed rank(s) when any
    exits non-zero (the others are stopped within :data:`GRACE_S` seconds).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1. Got {nproc}.")
    port = free_port()
    cmd = [sys.executable, "-m", "mtml", *args]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for r in range(nproc):  # own sessions, as torchrun starts its workers: signals come from here
            procs.append(subprocess.Popen(cmd, env=_worker_env(r, nproc, port, timeout), start_new_session=True))
        codes, stopped = _watch(procs)
    except KeyboardInterrupt:
        for p in procs:  # pass Ctrl-C on, so each rank stops the way one process would
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        _stop(procs)
        raise
    if all(c == 0 for c in codes):
        return
    failed = [_describe(r, c) for r, c in enumerate(codes) if c != 0 and r not in stopped]
    note = f"; stopped rank(s) {', '.join(map(str, stopped))}" if stopped else ""
    if any(Path(run_dir, "checkpoints").glob("step-*.safetensors")):
        hint = f"The run's checkpoints are kept: continue it with `mtml train --resume {run_dir}` (any --nproc)."
    else:
        hint = "No checkpoint was written, so there is nothing to resume."
    raise DistributedError(f"{nproc}-rank run failed: {'; '.join(failed)}{note}. {hint}")
