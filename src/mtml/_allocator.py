"""Keep freed large blocks for reuse: glibc's ``mallopt`` thresholds for the CPU training loop.

PyTorch's CPU tensors come from ``malloc``. By default glibc serves every block above 128 KiB to 32 MiB (its
threshold adapts) with a fresh ``mmap`` and gives it back to the kernel on ``free``, so a training step that
allocates the same activations every step page-faults through all of them again: on Conv-4 second-order MAML
(5-way 1-shot, 15 queries, 4 tasks, one thread) a zero-fill of one 15 MB activation took 5.8 ms instead of well
under one, and a whole meta-step 32 % more CPU time (``benchmarks/conv_maml.py --malloc default`` against
``--malloc keep``). :func:`keep_freed_memory` raises the mmap threshold to 1 GiB and turns off trimming, so freed
blocks stay in the heap and the next step reuses them; the price is that the process keeps its peak heap.

The command line calls it at start-up (``MTML_MALLOC=default`` leaves glibc's defaults); Python users can call it
themselves. It does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 1 GiB and its trim threshold to 2 GiB - 1 (once per process); ``True`` if
    set. ``False`` where the C library is not glibc, or when ``MTML_MALLOC=default``."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("MTML_MALLOC", "").strip().lower() == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _done
