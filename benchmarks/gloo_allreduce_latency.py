"""Latency of one all-reduce between 2 processes on this machine: gloo over loopback (the default) against
mtml's opt-in shared-memory path (``MTML_DIST_REDUCE=shm``, :mod:`mtml.engine._shm_reduce`), both through
``mtml.engine._distributed.all_reduce_``. It is the fixed cost every data-parallel step pays once, and it
decides when ``--nproc 2`` can win: a step whose compute per rank is not well above it gets slower with more
ranks (see docs/distributed.md).

    .venv/bin/python benchmarks/gloo_allreduce_latency.py --numel 1800
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, port: int, mode: str, numel: int, iterations: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      MTML_DIST_REDUCE=mode)
    torch.set_num_threads(1)
    from mtml.engine._distributed import all_reduce_, session

    with session():
        x = torch.randn(numel)
        for _ in range(max(10, iterations // 10)):
            all_reduce_(x)
        start = time.perf_counter()
        for _ in range(iterations):
            all_reduce_(x)
        ms = (time.perf_counter() - start) / iterations * 1e3
    if rank == 0:
        print(f"{mode:>13}: all-reduce of {numel} float32 between 2 processes: {ms:.3f} ms per call "
              f"(mean of {iterations} calls)", flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1800, help="floats per all-reduce (sinusoid MLP: ~1,800)")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--modes", nargs="+", default=["process-group", "shm"], choices=["process-group", "shm"])
    args = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for mode in args.modes:
        mp.spawn(_worker, args=(_port(), mode, args.numel, args.iterations), nprocs=2)


if __name__ == "__main__":
    main()
