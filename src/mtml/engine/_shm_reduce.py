"""An opt-in all-reduce for CPU ranks on one Linux machine (``MTML_DIST_REDUCE=shm``): every rank writes its
tensor into a shared-memory file and sums everybody's slots.

Why: a gloo all-reduce over loopback costs a fixed ~1.2 ms per call on the 2-core machines this project runs
on, whatever the size (``benchmarks/gloo_allreduce_latency.py``), as long as a small model's meta-step. On
whole shipped sinusoid runs on 2 ranks this path was >= 1.2x faster than gloo at 1 and at 5 inner steps
(docs/distributed.md, *How gradients are summed*), which is what keeps it; it stays opt-in because the
default is torch.distributed's own backend.

How: rank 0 creates one file in ``/dev/shm`` (nowhere else: a fallback such as ``/tmp`` may be a disk or a
network file system), every rank maps it, and rank 0 unlinks it in a ``finally`` once every rank has mapped it
or set-up failed. The file holds a token (so a rank never maps another run's file), one POSIX semaphore per
ordered pair of ranks, and two alternating buffers of one slot per rank, each slot with a header
``(call, total elements, dtype, chunk start, chunk elements)``.

Call ``k`` (one per chunk of at most :data:`SLOT_BYTES`) writes this rank's chunk and header into its slot of
buffer ``k mod 2``, posts the semaphore ``(rank → j)`` of every other rank ``j``, then waits once on each
``(j → rank)``. ``sem_post`` and ``sem_wait`` synchronise memory (POSIX.1-2008, 4.12 *Memory
Synchronization*): every write a rank made before its post is visible to the rank whose wait it ends, on any
CPU, not only x86's ordered stores. One semaphore per pair means a fast rank's post for call ``k + 1`` can
never be counted for call ``k``. Before summing, every rank checks every slot's header against its own, so
ranks that pass different sizes or dtypes all stop with the same error instead of summing garbage. A slot is
never overwritten while another rank reads it: to write call ``k + 2`` into the same buffer a rank must have
passed call ``k + 1``, for which every other rank posted only after it had finished reading call ``k``. The
slots are summed in rank order, so every rank computes the same bits.

A waiting rank first polls (``sem_trywait``, about 60 µs: its peer is usually about to post), then yields
the CPU between polls for up to 2 ms (the skew between ranks' steps; sleeping at once cost a futex wake-up per
step), then sleeps in the kernel (``sem_timedwait``) in short slices, and gives up after the collective timeout with a
:class:`RuntimeError`, which the caller turns into its usual one-line error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SHM_DIR", "SLOT_BYTES", "MismatchError", "SharedReducer", "problem_here"]

#: bytes per rank and buffer; larger tensors go through in chunks of this size
SLOT_BYTES = 1 << 18
SHM_DIR = Path("/dev/shm")
_LINE = 64  # bytes per semaphore and per slot header (a cache line each; sem_t is 32 bytes on 64-bit Linux)
_TOKEN = 16
_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4, torch.int32: 5,
           torch.int64: 6}
_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPES.items()}
_POLLS = 200  # sem_trywait calls before sleeping in sem_timedwait
_YIELD_S = 0.002  # then this long yielding the CPU between checks (a step's compute differs by about this)
_SLICE_S = 0.2  # then sleep in slices of this (lets Python run signal handlers between them)


class MismatchError(Exception):
    """Ranks passed tensors of different sizes or dtypes to the same all-reduce (seen by every rank)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_semaphores() -> Any | None:
    """libc's POSIX semaphore functions (``None`` when this system has none)."""
    if not sys.platform.startswith("linux"):
        return None
    for name in (None, ctypes.util.find_library("c"), ctypes.util.find_library("pthread")):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            for fn in ("sem_init", "sem_post", "sem_trywait", "sem_timedwait"):
                getattr(lib, fn)
        except (OSError, AttributeError):
            continue
        lib.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        lib.sem_post.argtypes = lib.sem_trywait.argtypes = [ctypes.c_void_p]
        lib.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
        return lib
    return None


_SEM = _load_semaphores()


def problem_here() -> str:
    """Why this machine cannot use the shared-memory all-reduce (``""`` when it can)."""
    if _SEM is None:
        return f"it needs Linux with POSIX semaphores (this is {sys.platform})"
    if not (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)):
        return f"{SHM_DIR} is not a writable directory"
    return ""


def _layout(world: int) -> tuple[int, int, int, int]:
    """Offsets of the semaphores, the slot headers and the data, and the file size."""
    sems = _LINE
    headers = sems + _LINE * world * world
    data = headers + _LINE * 2 * world
    return sems, headers, data, data + 2 * world * SLOT_BYTES


class SharedReducer:
    """Sums CPU tensors over ``world`` ranks of one machine through a shared file.

    Build it with :meth:`create` on rank 0 and :meth:`attach` on the others (the path travels through the
    process group); every rank must then call :meth:`all_reduce_` in the same order, as for any collective
    (a rank that passes another size or dtype makes every rank raise).
    """

    def __init__(self, path: Path, rank: int, world: int, token: bytes) -> None:
        assert _SEM is not None, problem_here()
        self.rank, self.world = rank, world
        sems, headers, data, size = _layout(world)
        self._map = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
        if bytes(self._map[:_TOKEN]) != token:
            raise RuntimeError(f"{path} does not hold this run's token")
        base = self._map.ctypes.data
        self._sems = [[base + sems + _LINE * (i * world + j) for j in range(world)] for i in range(world)]
        self._head = np.ndarray((2, world, 5), dtype=np.int64, buffer=self._map, offset=headers,
                                strides=(_LINE * world, _LINE, 8))
        self._data = torch.from_numpy(np.ndarray((2, world, SLOT_BYTES), dtype=np.uint8, buffer=self._map,
                                                 offset=data))
        self._calls = 0

    @classmethod
    def create(cls, world: int) -> tuple[SharedReducer, str, bytes]:
        """Rank 0: a new file in /dev/shm with its semaphores set up; returns the reducer, the file's path and
        the token the others check. The caller unlinks the file (see :mod:`mtml.engine._distributed`)."""
        problem = problem_here()
        if problem:
            raise OSError(problem)
        token = secrets.token_bytes(_TOKEN)
        path = SHM_DIR / f"mtml-reduce-{os.getpid()}-{secrets.token_hex(6)}"
        sems, _, _, size = _layout(world)
        try:
            with open(path, "xb") as f:
                f.truncate(size)
                f.write(token)
            reducer = cls(path, 0, world, token)
            for i in range(world * world):
                if _SEM.sem_init(reducer._map.ctypes.data + sems + _LINE * i, 1, 0) != 0:  # type: ignore[union-attr]
                    raise OSError(ctypes.get_errno(), "sem_init failed")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return reducer, str(path), token

    @classmethod
    def attach(cls, path: str, rank: int, world: int, token: bytes) -> SharedReducer:
        found = Path(path)
        if found.parent != SHM_DIR:
            raise ValueError(f"{path} is not in {SHM_DIR}")
        return cls(found, rank, world, token)

    @staticmethod
    def takes(tensor: torch.Tensor) -> bool:
        """Whether this path sums ``tensor`` (contiguous, on the CPU, of a dtype in the header's table); the
        caller sends others to the process group. Size does not matter: large tensors go in chunks."""
        return tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in _DTYPES

    def all_reduce_(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        """Sum ``tensor`` (one that :meth:`takes`) over the ranks, in place. :class:`MismatchError` if the ranks
        passed different sizes or dtypes, :class:`RuntimeError` if a rank does not answer in time."""
        flat = tensor.view(-1)
        step = SLOT_BYTES // tensor.element_size()
        for start in range(0, max(flat.numel(), 1), step):
            self._chunk(flat, start, min(step, flat.numel() - start), timeout)
        return tensor

    def _chunk(self, flat: torch.Tensor, start: int, n: int, timeout: float) -> None:
        self._calls += 1
        k, r = self._calls, self.rank
        b, nbytes = k % 2, n * flat.element_size()
        slots = self._data[b, :, :nbytes]
        slots[r].copy_(flat[start: start + n].view(torch.uint8))
        mine = (k, flat.numel(), _DTYPES[flat.dtype], start, n)
        self._head[b, r] = mine
        for j in range(self.world):
            if j != r and _SEM.sem_post(self._sems[r][j]) != 0:  # type: ignore[union-attr]
                raise RuntimeError(f"sem_post failed (errno {ctypes.get_errno()})")
        deadline = time.monotonic() + timeout
        for j in range(self.world):
            if j != r:
                self._wait(self._sems[j][r], deadline, j, k, timeout)
        heads = self._head[b].tolist()
        if any(tuple(h) != mine for h in heads):
            raise MismatchError("the ranks passed different tensors to one all-reduce: " + ", ".join(
                f"rank {i}: {h[1]} {_NAMES.get(h[2], '?')}" for i, h in enumerate(heads)))
        torch.sum(slots.view(flat.dtype), 0, out=flat[start: start + n])

    def _wait(self, sem: int, deadline: float, peer: int, k: int, timeout: float) -> None:
        lib = _SEM
        assert lib is not None
        for _ in range(_POLLS):
            if lib.sem_trywait(sem) == 0:
                return
        until = time.monotonic() + _YIELD_S
        while time.monotonic() < until:  # the peer is busy, not gone: give the core away, keep checking
            os.sched_yield()
            if lib.sem_trywait(sem) == 0:
                return
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"rank {peer} did not join shared-memory all-reduce #{k} within {timeout:g}s")
            until = time.time() + min(_SLICE_S, deadline - now)
            ts = _Timespec(int(until), int((until % 1) * 1e9))
            if lib.sem_timedwait(sem, ctypes.byref(ts)) == 0:
                return
