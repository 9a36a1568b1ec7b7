"""Latency of one gloo all-reduce between 2 processes on this machine (loopback), the fixed cost that every
data-parallel step pays once. It decides when ``--nproc 2`` can win: a step whose compute per rank is not well
above this latency gets slower with more ranks (see docs/distributed.md).

    .venv/bin/python benchmarks/gloo_allreduce_latency.py --numel 1800
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, port: int, numel: int, iterations: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.randn(numel)
    for _ in range(max(10, iterations // 10)):
        dist.all_reduce(x)
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(x)
    ms = (time.perf_counter() - start) / iterations * 1e3
    if rank == 0:
        print(f"gloo all-reduce of {numel} float32 between 2 processes: {ms:.3f} ms per call "
              f"(mean of {iterations} calls)")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1800, help="floats per all-reduce (sinusoid MLP: ~1,800)")
    ap.add_argument("--iterations", type=int, default=500)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args.numel, args.iterations), nprocs=2)


if __name__ == "__main__":
    main()
