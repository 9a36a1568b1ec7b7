"""A low-latency all-reduce for ranks on one machine: every rank writes its tensor into a shared-memory file
and sums everybody's slots.

Why: a gloo all-reduce over loopback costs a fixed ~1.1-1.3 ms on the 2-core machines this project runs on,
whatever the size (``benchmarks/gloo_allreduce_latency.py``). A meta-step of a small model takes about as
long, so data parallelism over 2 processes made it slower. Through shared memory the same sum costs a few
microseconds plus the copies (``benchmarks/gloo_allreduce_latency.py --modes process-group shm``).

How: the ranks map one file (created by rank 0 in ``/dev/shm``, unlinked as soon as every rank has mapped it,
so nothing is left behind by a crash). It holds one sequence number per rank and, for each of two alternating
buffers, one slot per rank. Call ``k`` writes this rank's tensor into its slot of buffer ``k mod 2``, then
publishes ``k`` as its sequence number, waits until every rank has published ``k`` and sums the slots in rank
order, so every rank computes the same bits. A rank cannot overwrite a slot that another is still reading:
to publish ``k + 2`` on the same buffer it must first have seen every rank publish ``k + 1``, which each does
only after it has finished reading ``k``. The write-then-publish order relies on x86's store ordering, so
the path is only offered on x86-64; elsewhere (and across machines, on GPUs, or for tensors larger than a
slot) the caller uses the process group's own all-reduce.

The waiting rank spins (yielding the CPU after a few hundred checks) and gives up after the collective
timeout with a :class:`RuntimeError`, which the caller turns into its usual one-line error.
"""

from __future__ import annotations

import os
import platform
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["SLOT_BYTES", "SharedReducer", "supported_here"]

#: bytes per rank and buffer: tensors up to this size (64k float32 or 32k float64 elements) take the shared
#: path; larger ones are bandwidth-bound, where the process group's all-reduce is as good.
SLOT_BYTES = 1 << 18
_HEADER = 64  # bytes per rank for its sequence number (one cache line each: no false sharing)
_TOKEN = 16


def supported_here() -> bool:
    """Whether this machine's memory model allows the write-then-publish protocol (x86-64)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def _file_size(world: int) -> int:
    return _HEADER * world + _TOKEN + 2 * world * SLOT_BYTES


def _directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class SharedReducer:
    """Sums same-shaped CPU tensors over ``world`` ranks of one machine through a shared file.

    Build it with :meth:`create` on rank 0 and :meth:`attach` on the others (the path travels through the
    process group); every rank must then call :meth:`all_reduce_` in the same order with tensors of the same
    size and dtype, as for any collective.
    """

    def __init__(self, path: Path, rank: int, world: int, token: bytes) -> None:
        self.rank, self.world = rank, world
        self._map = np.memmap(path, dtype=np.uint8, mode="r+", shape=(_file_size(world),))
        if bytes(self._map[_HEADER * world: _HEADER * world + _TOKEN]) != token:
            raise RuntimeError(f"{path} does not hold this run's token (another machine's file?)")
        self._seq = np.ndarray((world,), dtype=np.int64, buffer=self._map, offset=0, strides=(_HEADER,))
        self._data = torch.from_numpy(np.ndarray((2, world, SLOT_BYTES), dtype=np.uint8, buffer=self._map,
                                                 offset=_HEADER * world + _TOKEN))
        self._calls = int(self._seq[rank])

    @classmethod
    def create(cls, world: int) -> tuple[SharedReducer, str, bytes]:
        """Rank 0: a new zeroed file; returns the reducer, the file's path and the token the others check."""
        token = secrets.token_bytes(_TOKEN)
        path = _directory() / f"mtml-reduce-{os.getpid()}-{secrets.token_hex(6)}"
        with open(path, "wb") as f:
            f.truncate(_file_size(world))
            f.seek(_HEADER * world)
            f.write(token)
        return cls(path, 0, world, token), str(path), token

    @classmethod
    def attach(cls, path: str, rank: int, world: int, token: bytes) -> SharedReducer:
        return cls(Path(path), rank, world, token)

    @staticmethod
    def fits(tensor: torch.Tensor) -> bool:
        return (tensor.device.type == "cpu" and tensor.is_contiguous()
                and (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64))
                and tensor.numel() * tensor.element_size() <= SLOT_BYTES)

    def all_reduce_(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; :class:`RuntimeError` if a rank does not answer in time."""
        self._calls += 1
        k = self._calls
        nbytes = tensor.numel() * tensor.element_size()
        slots = self._data[k % 2, :, :nbytes]
        slots[self.rank].copy_(tensor.reshape(-1).view(torch.uint8))
        self._seq[self.rank] = k  # publish: every store above is visible before this one (x86 ordering)
        self._wait(k, timeout)
        torch.sum(slots.view(tensor.dtype), 0, out=tensor.view(-1))
        return tensor

    def _wait(self, k: int, timeout: float) -> None:
        seq, spins, deadline = self._seq, 0, 0.0
        while seq.min() < k:
            spins += 1
            if spins < 256:
                continue
            os.sched_yield()
            if spins % 1024 == 0:
                now = time.monotonic()
                if not deadline:
                    deadline = now + timeout
                elif now > deadline:
                    late = [r for r in range(self.world) if seq[r] < k]
                    raise RuntimeError(f"rank(s) {', '.join(map(str, late))} did not join shared-memory "
                                       f"all-reduce #{k} within {timeout:g}s")
                if spins > 1 << 16:
                    time.sleep(0.0005)  # a long wait (a slow step elsewhere): stop burning the core

