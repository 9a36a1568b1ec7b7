"""Data-parallel training over ``torch.distributed``: process-group set-up, sharding, gradient all-reduce,
spreading independent jobs over ranks, and clear errors instead of hangs.

Every helper is a no-op when no process group is running (or it has one rank), so single-process code paths
are unchanged. The group is started from the environment ``torchrun`` (or ``mtml train --nproc N``) sets:
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; gloo on CPU, NCCL on GPU. Collectives time out
after ``MTML_DIST_TIMEOUT`` seconds (default 120) instead of PyTorch's 30 minutes.

Tensors are summed with the process group's own all-reduce. ``MTML_DIST_REDUCE=shm`` opts CPU ranks of one
Linux machine into a shared-memory all-reduce (:mod:`mtml.engine._shm_reduce`) instead of gloo's loopback
sockets, whose fixed ~1.2 ms per call is as long as a small model's whole step; ``process-group`` (the
default) always uses gloo/NCCL. Rank 0's setting applies to every rank.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

import mtml.engine._preempt as preempt
from mtml.engine._shm_reduce import MismatchError, SharedReducer, problem_here
from mtml.errors import ConfigError, MtmlError

__all__ = [
    "DistributedError", "all_gather_objects", "all_reduce_", "broadcast_from_main", "fault_point", "fresh_round",
    "is_distributed",
    "is_main", "map_ranks", "rank", "reduce_gradients", "session", "shard", "stop_agreed", "world_size",
]

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT = 120.0
#: True while a rank runs one of :func:`map_ranks`'s jobs on its own: collectives are off inside it.
_LOCAL: ContextVar[bool] = ContextVar("mtml_distributed_local", default=False)
_RESUME_HINT = ("The run's checkpoints are kept: the same command (or torchrun restarting the group) continues it, "
                "as does `mtml train --resume RUN`, on any number of ranks.")


class DistributedError(MtmlError, RuntimeError):
    """A rank failed, vanished or timed out; the others stop instead of waiting forever."""


#: each process group's shared-memory reducer (``None``: that group uses its own all-reduce)
_REDUCERS: weakref.WeakKeyDictionary[Any, SharedReducer | None] = weakref.WeakKeyDictionary()
REDUCE_MODES = ("process-group", "shm")


def is_distributed() -> bool:
    """True inside a process group of more than one rank (and not inside a :func:`map_ranks` job)."""
    return not _LOCAL.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def env_timeout() -> float:
    """Collective timeout in seconds from ``MTML_DIST_TIMEOUT`` (default 120)."""
    raw = os.environ.get("MTML_DIST_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"MTML_DIST_TIMEOUT must be a number of seconds > 0. Got {raw!r}.")
    return value


def _start_from_env(device: torch.device) -> bool:
    """Join the process group described by the environment; False when there is none (or one rank).

    Everything is read from the environment of this start (nothing is cached across torchrun's restarts).
    Under torchrun's shared store (``TORCHELASTIC_USE_AGENT_STORE=True``, its default) the group meets under
    a key prefix fresh to this start (:func:`fresh_round`): torchrun keeps one store for all restarts, and
    the keys of the group it restarted would otherwise send the new ranks to the dead ones' ports.
    """
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start "
                          "the ranks with `torchrun` or `mtml train --nproc N`.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))  # NCCL's object collectives use the current device
    timeout = timedelta(seconds=env_timeout())
    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), w, is_master=False,
                                  timeout=timeout)
            prefix = fresh_round(store, r, w, timeout.total_seconds())
            dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=r, world_size=w,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {r} could not join the process group ({_first_line(exc)}). "
                               f"{_rendezvous()}") from None
    return True


def _rendezvous() -> str:
    """What a rank was told to meet at, and what to check when it could not."""
    env = os.environ
    where = f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    if "TORCHELASTIC_RUN_ID" in env:
        where += (f" (torchrun rendezvous id {env['TORCHELASTIC_RUN_ID']!r}, restart "
                  f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')} of {env.get('TORCHELASTIC_MAX_RESTARTS', '0')})")
    return (f"Rendezvous: {where}, world size {env.get('WORLD_SIZE')}. Check that every node runs the same "
            "command with the same rendezvous flags, that this address and port are reachable from every node, "
            f"and that all ranks start within MTML_DIST_TIMEOUT={env.get('MTML_DIST_TIMEOUT', DEFAULT_TIMEOUT)}s.")


_POLL_S = 0.005


def fresh_round(store: dist.Store, rank: int, world: int, timeout: float) -> str:
    """A key prefix that every rank of this start gets and no earlier start used (collective over ``store``).

    Rank 0 draws a random nonce. Every other rank posts a random token under ``hello/<rank>`` and waits for
    the nonce under ``reply/<token>``, then acknowledges it under ``ack/<nonce>/<rank>``; rank 0 answers
    whatever token it finds under each ``hello`` until every rank has acknowledged. A token left by a rank
    of an earlier start gets an answer nobody reads, and every key a rank waits on is new, so no stale value
    is ever taken (torchrun's own restart count cannot serve: each node's agent counts its own restarts).
    """
    base = f"mtml/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if rank != 0:
        token = secrets.token_hex(8)
        store.set(f"{base}/hello/{rank}", token)
        store.wait([f"{base}/reply/{token}"], timedelta(seconds=timeout))
        nonce = store.get(f"{base}/reply/{token}").decode()
        store.set(f"{base}/ack/{nonce}/{rank}", "1")
        return f"{base}/round/{nonce}/"
    nonce = secrets.token_hex(8)
    answered: dict[int, str] = {}
    pending = set(range(1, world))
    deadline = time.monotonic() + timeout
    while pending:
        for r in sorted(pending):
            if store.check([f"{base}/ack/{nonce}/{r}"]):
                pending.discard(r)
            elif store.check([f"{base}/hello/{r}"]):
                token = store.get(f"{base}/hello/{r}").decode()
                if answered.get(r) != token:
                    store.set(f"{base}/reply/{token}", nonce)
                    answered[r] = token
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"rank(s) {', '.join(map(str, sorted(pending)))} did not arrive within {timeout:g}s")
        if pending:
            time.sleep(_POLL_S)
    return f"{base}/round/{nonce}/"


@contextmanager
def session(device: torch.device | None = None) -> Iterator[None]:
    """Join the environment's process group for the duration of the block (if there is one and none runs yet);
    leave it when the block ends normally."""
    started = _start_from_env(device or torch.device("cpu"))
    yield
    if started:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """On GPU, each rank of a node takes its own device ``cuda:LOCAL_RANK`` unless one is named."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(exc).__name__  # drop gloo's "[file.cc:N]"
    return line.split(". ")[0][:200]


def _collective(what: str, call: Callable[[], T]) -> T:
    """Run one collective; a lost peer or a timeout becomes one :class:`DistributedError` line."""
    try:
        return call()
    except (RuntimeError, ValueError) as exc:  # DistBackendError / DistNetworkError are RuntimeErrors
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed ({_first_line(exc)}). Another rank stopped or did "
            f"not answer within MTML_DIST_TIMEOUT={env_timeout():g}s. {_RESUME_HINT}"
        ) from None


def shard(n: int, what: str = "items") -> slice:
    """This rank's contiguous share of ``n`` items (sizes differ by at most one, lower ranks first)."""
    w, r = world_size(), rank()
    if n < w:
        raise ConfigError(f"{what}: {n} cannot be split over {w} ranks (each rank needs at least one). Use "
                          f"fewer ranks or a larger batch.")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def reduce_mode() -> str:
    """``MTML_DIST_REDUCE``: how tensors are summed over ranks (see the module docstring)."""
    mode = os.environ.get("MTML_DIST_REDUCE", "process-group")
    if mode not in REDUCE_MODES:
        why = " (auto was removed: the default is the process group, shared memory is opt-in)" if mode == "auto" else ""
        raise ConfigError(f"MTML_DIST_REDUCE must be one of {', '.join(REDUCE_MODES)}. Got {mode!r}{why}.")
    return mode


def _set_up_shared() -> SharedReducer | None:
    """Collective, once per process group: the shared-memory reducer when rank 0 asks for it (every rank
    raises when one cannot map rank 0's file); ``None`` for the process group's all-reduce."""
    mode = reduce_mode()
    if dist.get_backend() != "gloo":
        if mode == "shm":
            raise ConfigError("MTML_DIST_REDUCE=shm needs CPU ranks (the gloo backend); unset it on GPUs.")
        return None
    box: list[Any] = [mode]  # rank 0's setting decides for all, so ranks started with different ones agree
    _collective("setting up the all-reduce", lambda: dist.broadcast_object_list(box, src=0))
    if box[0] != "shm":
        return None
    w, r = world_size(), rank()
    reducer: SharedReducer | None = None
    problem, offer = problem_here(), None
    try:
        if r == 0 and not problem:
            try:
                reducer, path, token = SharedReducer.create(w)
                offer = (path, token)
            except OSError as exc:
                problem = f"rank 0 could not create its file ({exc})"
        box = [offer]
        _collective("setting up the shared-memory all-reduce", lambda: dist.broadcast_object_list(box, src=0))
        if r != 0 and box[0] is not None and not problem:
            try:
                reducer = SharedReducer.attach(box[0][0], r, w, box[0][1])
            except (OSError, RuntimeError, ValueError) as exc:
                problem = f"rank {r} could not map {box[0][0]} ({exc})"
        if box[0] is None and not problem:
            problem = "rank 0 offered no file"
        problems = [p for p in all_gather_objects(problem, "setting up the shared-memory all-reduce") if p]
    finally:
        if offer is not None:  # rank 0: every rank has mapped it, or set-up failed: no file outlives it
            Path(offer[0]).unlink(missing_ok=True)
    if problems:
        raise DistributedError(f"MTML_DIST_REDUCE=shm, but the ranks cannot share memory: {problems[0]}. Unset "
                               "it to sum through the process group.")
    return reducer


def _shared() -> SharedReducer | None:
    group = dist.group.WORLD
    if group not in _REDUCERS:
        _REDUCERS[group] = _set_up_shared()
    return _REDUCERS[group]


def all_reduce_(tensor: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (no-op on one rank): the process group's all-reduce, or shared
    memory under ``MTML_DIST_REDUCE=shm`` for CPU tensors of the dtypes it sums (see the module docstring)."""
    if is_distributed():
        shared = _shared()
        if shared is not None and shared.takes(tensor):
            try:
                _collective(what, lambda: shared.all_reduce_(tensor, env_timeout()))
            except MismatchError as exc:
                raise DistributedError(f"rank {rank()} of {world_size()}: {what} failed: {exc}. Every rank must "
                                       "pass the same sizes and dtypes, in the same order.") from None
        else:
            _collective(what, lambda: dist.all_reduce(tensor))
    return tensor


def reduce_gradients(params: Sequence[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum the ``.grad`` of ``params`` (and the vector ``extra``, e.g. metrics) over ranks in ONE all-reduce.

    A parameter that has no gradient on any rank keeps ``grad = None`` (so optimisers skip it, as in one
    process); one that has a gradient on some ranks only gets zeros elsewhere. Returns the summed ``extra``.
    """
    if not is_distributed():
        return extra
    ref = params[0] if params else (extra if extra is not None else torch.zeros(()))
    dtype, device = torch.float64 if ref.dtype == torch.float64 else torch.float32, ref.device
    parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype,
                                                                                  device=device) for p in params]
    # one flag per parameter (had a gradient), then this rank's stop vote (a pending SIGTERM, see _preempt)
    flags = torch.tensor([*(p.grad is not None for p in params), preempt.vote()], dtype=dtype, device=device)
    tail = [extra.reshape(-1).to(dtype=dtype, device=device)] if extra is not None else []
    flat = torch.cat([*parts, flags, *tail])
    all_reduce_(flat, "the gradient all-reduce")
    offset, total = 0, sum(x.numel() for x in parts)
    *had, votes = flat[total: total + len(params) + 1].tolist()  # one copy to the host for flags and vote
    preempt.tally(votes)
    for p, seen in zip(params, had, strict=True):
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype) if seen > 0 else None
        offset += n
    if extra is None:
        return None
    return flat[total + len(params) + 1:].view_as(extra).to(extra.dtype)


def all_gather_objects(obj: T, what: str = "gathering results") -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` on one rank). Objects travel pickled."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective(what, lambda: dist.all_gather_object(out, obj))
    return out


def map_ranks(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, with the calls spread over ranks; every rank gets the whole list, in order.

    Item ``i`` is computed by rank ``i % world_size``. Every rank iterates ``items`` in full (so lazily drawn
    items, e.g. episodes from a seeded generator, stay in step) but calls ``fn`` only on its own; results are
    gathered with ``all_gather_object``, so they must pickle. Inside ``fn`` the rank works alone (mtml's steps
    and helpers see one process, and rank-0-only writes happen on every rank), so ``fn`` may train a whole
    run. For embarrassingly parallel jobs: meta-test episodes, seeds, pairs of a transfer matrix.
    """
    if not is_distributed():
        return [fn(x) for x in items]
    w, r = world_size(), rank()
    token = _LOCAL.set(True)  # a job runs on one rank: steps and evaluations inside it are single-process
    try:
        mine = [(i, fn(x)) for i, x in enumerate(items) if i % w == r]
    finally:
        _LOCAL.reset(token)
    merged = [pair for part in all_gather_objects(mine, "gathering map_ranks results") for pair in part]
    return [value for _, value in sorted(merged, key=lambda pair: pair[0])]


def broadcast_from_main(fn: Callable[[], T], what: str = "sharing rank 0's result") -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; an :class:`MtmlError` it raises is raised
    on every rank (so a bad start fails everywhere at once instead of leaving the others waiting)."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except MtmlError as exc:
            box[0] = ("error", exc)
            _collective(what, lambda: dist.broadcast_object_list(box, src=0))
            raise
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    status, value = box[0]
    if status == "error":
        value.echo_of_rank = 0  # the CLI prints it once, on rank 0
        raise value
    return value


def stop_agreed(tallied_before: int) -> bool:
    """Whether every rank stops after this step (a SIGTERM reached one of them: see :mod:`._preempt`).
    Collective on several ranks when the step made no gradient all-reduce (``tallied_before`` is
    :func:`._preempt.tallies` from before the step); then the vote takes one small all-reduce of its own."""
    if not is_distributed():
        return preempt.requested()
    if preempt.tallies() == tallied_before:
        box = torch.tensor([preempt.vote()])
        all_reduce_(box, "the stop vote")
        preempt.tally(float(box[0]))
    return preempt.agreed()


def fault_point(step: int) -> None:
    """Test hook: with ``MTML_FAULT_AT_STEP=k`` the rank ``MTML_FAULT_RANK`` (default 1) of a multi-rank run
    fails at step ``k`` (one process, when ``MTML_FAULT_RANK=0``): ``MTML_FAULT_MODE=kill`` (default) SIGKILLs
    itself, ``hang`` stops answering, ``term`` sends itself SIGTERM (a preemption). ``k1,k2,…`` fails start
    ``i`` of a torchrun group (``TORCHELASTIC_RESTART_COUNT=i``) at step ``k_{i+1}``; later starts run clean."""
    if "MTML_FAULT_AT_STEP" not in os.environ or _LOCAL.get():
        return
    target = int(os.environ.get("MTML_FAULT_RANK", "1"))
    if not is_distributed() and target != 0:  # one process fails only when rank 0 is named
        return
    steps = [int(k) for k in os.environ["MTML_FAULT_AT_STEP"].split(",") if k.strip()]
    start = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if start >= len(steps) or step != steps[start] or rank() != target:
        return
    mode = os.environ.get("MTML_FAULT_MODE", "kill")
    if mode == "hang":
        time.sleep(3600.0)
    os.kill(os.getpid(), signal.SIGTERM if mode == "term" else signal.SIGKILL)
