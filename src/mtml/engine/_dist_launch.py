"""``mtml train|eval|transfer --nproc N``: start N worker processes on this machine (gloo over loopback, or
one GPU each) and watch them; when one fails, stop the others at once and say which rank failed and how.

Each worker runs the same ``mtml …`` command with the environment ``torchrun`` would give it
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so a run
started here and one started by ``torchrun --nproc-per-node N -m mtml train …`` are the same run.

How workers start (``MTML_LAUNCH``): ``fork`` (the default on Linux, when the launcher runs no Python
thread besides the main one and has not started CUDA) forks them from the launcher, which has already
imported torch, mtml and, for commands that train, torch's compiler front end (``torch.optim`` imports it
on first use): about 3 s of imports each worker would otherwise repeat, as long as a short run's training.
``spawn`` (the default elsewhere) starts fresh ``python -m mtml …`` interpreters. The launcher itself never
touches a tensor, so the forked workers start with no thread pool or device state to inherit.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, Protocol

from mtml.engine._distributed import DistributedError
from mtml.engine._preempt import Terminated
from mtml.errors import ConfigError

__all__ = ["LAUNCH_METHODS", "OPTIMIZER_IMPORTS", "PRELOAD", "free_port", "launch", "launch_method"]

LAUNCH_METHODS = ("auto", "fork", "spawn")
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
#: imported by the launcher before it forks, so that no worker imports them again (callers add their own)
PRELOAD = ("torch", "torch.distributed")
#: what ``torch.optim`` imports on first use (1.3 s): preload it for commands whose workers train
OPTIMIZER_IMPORTS = ("torch.optim", "torch._dynamo")

GRACE_S = 5.0  # how long a stopped rank gets to exit after SIGTERM before SIGKILL
SETTLE_S = 0.5  # ranks that saw the failure themselves get this long to exit with their own message
TERMINATED = 128 + signal.SIGTERM  # how a rank that stopped on SIGTERM exits (143)
PREEMPT_GRACE_S = 30.0  # after a SIGTERM is passed on: time for the ranks to finish a step and checkpoint it


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_env(rank: int, nproc: int, port: int, timeout: float | None) -> dict[str, str]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "MTML_LAUNCHED": "1"}  # a worker of this launcher: Ctrl-C is reported once, by the launcher
    if timeout is not None:
        env["MTML_DIST_TIMEOUT"] = str(timeout)
    return env


def launch_method() -> str:
    """``MTML_LAUNCH`` resolved: ``fork`` or ``spawn`` (see the module docstring)."""
    method = os.environ.get("MTML_LAUNCH", "auto")
    if method not in LAUNCH_METHODS:
        raise ConfigError(f"MTML_LAUNCH must be one of {', '.join(LAUNCH_METHODS)}. Got {method!r}.")
    can_fork = hasattr(os, "fork") and sys.platform.startswith("linux")
    if method == "fork" and not can_fork:
        raise ConfigError(f"MTML_LAUNCH=fork needs Linux; this is {sys.platform}. Use spawn (or auto).")
    if method == "auto":
        return "fork" if can_fork and threading.active_count() == 1 and not _cuda_started() else "spawn"
    return method


def _cuda_started() -> bool:
    """Whether this process has started CUDA (a forked child could not use it then)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


class _Worker(Protocol):
    """What the watcher needs of a worker: the part of ``subprocess.Popen``'s interface it uses."""

    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class _Forked:
    """A worker forked from this process that runs ``entry(args)`` in a session of its own and exits with
    its status (``SystemExit`` codes as given, 1 on any other exception, whose traceback it prints)."""

    def __init__(self, entry: Callable[[list[str]], object], args: Sequence[str], env: dict[str, str]) -> None:
        self.returncode: int | None = None
        sys.stdout.flush()
        sys.stderr.flush()
        launcher = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_forked(entry, list(args), env, launcher)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked rank (pid {self.pid})", timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _end_with_launcher(launcher: int) -> None:
    """Ask Linux to SIGTERM this process when the launcher dies (even by SIGKILL), so no rank is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # it died before the request was made
        os._exit(128 + signal.SIGTERM)


def _run_forked(entry: Callable[[list[str]], object], args: list[str], env: dict[str, str],
                launcher: int) -> NoReturn:
    """The body of a forked worker: never returns (``os._exit``, so the launcher's exit handlers do not run
    twice)."""
    code = 1
    try:
        os.setsid()  # its own session, as torchrun starts its workers: signals come from the launcher
        _end_with_launcher(launcher)
        os.environ.clear()
        os.environ.update(env)
        entry(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a worker reports any failure through its exit status
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


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


def _stop(procs: Sequence[_Worker], settle: float = SETTLE_S) -> list[int]:
    """SIGTERM every rank still running after ``settle`` seconds, SIGKILL those still there after
    :data:`GRACE_S`; returns the ranks it had to stop."""
    settle = time.monotonic() + settle
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


def _watch(procs: Sequence[_Worker], poll_s: float = 0.05) -> tuple[list[int], list[int]]:
    """Wait for every rank; on the first failure stop the rest. Returns exit codes and the stopped ranks."""
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            stopped = _stop(procs)
            return [p.wait() for p in procs], stopped  # _stop left none running
        if all(c == 0 for c in codes):
            return [0] * len(procs), []
        time.sleep(poll_s)


#: ranks per usable core beyond which :func:`launch` refuses (unless ``MTML_ALLOW_OVERSUBSCRIBE=1``)
OVERSUBSCRIBE = 4


def check_ranks(nproc: int) -> None:
    """:class:`ConfigError` when ``nproc`` ranks would be more than :data:`OVERSUBSCRIBE` per usable core: a
    thousand forked interpreters exhaust memory long before they finish anything."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if nproc > OVERSUBSCRIBE * cores and os.environ.get("MTML_ALLOW_OVERSUBSCRIBE") != "1":
        raise ConfigError(f"--nproc {nproc} starts {nproc} processes on a machine with {cores} usable core(s); use "
                          f"at most {OVERSUBSCRIBE * cores} (one per core is the usual choice), or set "
                          "MTML_ALLOW_OVERSUBSCRIBE=1 to start them anyway.")


def _resume_hint(run_dir: Path | str | None) -> str:
    if run_dir is None:  # a job with no checkpoints (e.g. `mtml transfer`)
        return "Nothing was written; run the command again."
    if any(Path(run_dir, "checkpoints").glob("step-*.safetensors")):
        return (f"The run's checkpoints are kept: the same command continues it, as does `mtml train --resume "
                f"{run_dir}` (any --nproc).")
    return "No checkpoint was written, so there is nothing to resume."


def launch(args: Sequence[str], nproc: int, *, run_dir: Path | str | None, timeout: float | None = None,
           entry: Callable[[list[str]], object] | None = None, preload: Sequence[str] = ()) -> None:
    """Run ``mtml <args>`` as ``nproc`` ranks of one process group on this machine.

    ``entry(args)`` is the command line's entry point, called in each forked worker (see the module
    docstring) after the launcher has imported :data:`PRELOAD` and ``preload``; without it, or with
    ``MTML_LAUNCH=spawn``, workers are fresh ``python -m mtml <args>`` interpreters. Returns when every rank
    finished; raises :class:`DistributedError` naming the failed rank(s) when any exits non-zero (the others
    are stopped within :data:`GRACE_S` seconds).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1. Got {nproc}.")
    check_ranks(nproc)
    fork = entry is not None and launch_method() == "fork"
    if fork:
        for name in (*PRELOAD, *preload):
            importlib.import_module(name)
    port = free_port()
    cmd = [sys.executable, "-m", "mtml", *args]
    procs: list[_Worker] = []
    try:
        for r in range(nproc):  # own sessions, as torchrun starts its workers: signals come from here
            env = _worker_env(r, nproc, port, timeout)
            procs.append(_Forked(entry, args, env) if fork and entry is not None else
                         subprocess.Popen(cmd, env=env, start_new_session=True))
        codes, stopped = _watch(procs)
    except KeyboardInterrupt as exc:
        # pass Ctrl-C (or SIGTERM) on, so each rank stops the way one process would: on SIGTERM a training rank
        # finishes its step and rank 0 writes a checkpoint of it (mtml.engine._preempt), so they get longer
        term = isinstance(exc, Terminated)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if term else signal.SIGINT)
        _stop(procs, settle=PREEMPT_GRACE_S if term else SETTLE_S)
        raise
    if all(c == 0 for c in codes):
        return
    hint = _resume_hint(run_dir)
    if all(c in (0, TERMINATED) for c in codes) and not stopped:  # a rank got SIGTERM: all stopped at one step
        raise Terminated(f"terminated: a rank received SIGTERM and every rank stopped after the same step. {hint}")
    # causes first: a rank killed by a signal or crashing comes before ranks that stopped with their own error
    # after seeing it (which of them exits first is a race: gloo notices a lost peer at once)
    ranks = sorted((r for r, c in enumerate(codes) if c != 0 and r not in stopped), key=lambda r: codes[r] == 2)
    failed = [_describe(r, codes[r]) for r in ranks]
    note = f"; stopped rank(s) {', '.join(map(str, stopped))}" if stopped else ""
    raise DistributedError(f"{nproc}-rank run failed: {'; '.join(failed)}{note}. {hint}")
