"""A user's own process group: ``mtml.evaluate`` called on one rank of it must answer, not wait for the others.

Issue 17 found that ``evaluate`` always spread its work over the ranks of any process group (collectives), so a
user's DDP loop that evaluates on rank 0 only hung. Now it maps in this process unless told to spread
(``map_fn=map_ranks``, as mtml's own training passes). Real 2-process gloo group over loopback, forked.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from mtml.datasets import synthetic_linear
from mtml.engine import evaluate, map_ranks
from mtml.engine._dist_launch import free_port
from mtml.nn import build_multitask_model


def _rank(r: int, port: int, spread: bool, queue: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=r, world_size=2)
    try:
        tasks = synthetic_linear(num_tasks=4, in_dim=6, latent_dim=2, n_train=8, n_val=8, n_test=8, seed=0)
        torch.manual_seed(0)
        model = build_multitask_model(tasks, trunk_hidden=(4,))
        if spread:  # both ranks call it: the groups are spread and both get every task's metrics
            queue.put((r, sorted(evaluate(model, tasks, "val", map_fn=map_ranks))))
        elif r == 0:  # the user's loop: only rank 0 evaluates, then everyone meets at a barrier
            queue.put((r, sorted(evaluate(model, tasks, "val"))))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(spread: bool, timeout: float = 60.0) -> dict[int, list[str]]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, spread, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[int, list[str]] = {}
    deadline = time.monotonic() + timeout
    want = 2 if spread else 1
    while len(got) < want and time.monotonic() < deadline:
        try:
            r, names = queue.get(timeout=0.5)
            got[r] = names
        except Exception:  # queue.Empty
            continue
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got


def test_evaluate_on_one_rank_of_a_users_group_answers() -> None:
    got = _run(spread=False, timeout=60.0)
    assert got == {0: ["task_0", "task_1", "task_2", "task_3"]}


def test_evaluate_spread_over_the_ranks_gives_every_rank_all_metrics() -> None:
    got = _run(spread=True)
    assert got[0] == got[1] == ["task_0", "task_1", "task_2", "task_3"]
