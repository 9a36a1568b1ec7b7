"""Data-parallel scaling on one machine: training throughput with 1 vs N processes (gloo over loopback).

Two workloads, both through mtml's own data-parallel steps (``sharded_meta_step`` / ``sharded_joint_step``,
which are the plain steps on one process):

* ``maml`` — second-order MAML on sinusoids (MLP 1-40-40-1, 5 support + 10 query points, one inner step)
  at a meta-batch of ``--meta-batch`` tasks (default 100); throughput in meta-training tasks/s;
* ``joint`` — joint training of ``--joint-tasks`` synthetic regression tasks (default 100, batch 64 each,
  trunk 100→64→10) with a weighting (``--weighting``, default equal; ``pcgrad`` exercises the all-reduced
  per-task gradient matrix); throughput in task-batches/s.

Every process uses one torch thread. Worlds run in interleaved rounds (``--repeats``) so a change in machine
load hits both alike; the median per world and the ratio N/1 are printed. ``--e2e`` also times whole
``mtml train --nproc N`` runs (start-up included) of the same MAML setting. ``--independent`` also times N
processes that each train on 1/N of the meta-batch with no process group at all: the upper bound that
splitting the batch can reach on this machine, whatever the communication costs. ``--reduce`` names the
``MTML_DIST_REDUCE`` settings the N-process runs use (default ``process-group``); with several (``--reduce
process-group shm``) every one runs in each round and their ratios to the first are printed: the benchmark
that decides whether the opt-in shared-memory all-reduce keeps its place (docs/distributed.md).

    .venv/bin/python benchmarks/distributed_scaling.py --repeats 3
    .venv/bin/python benchmarks/distributed_scaling.py --workloads --e2e --e2e-steps 12000 --reduce process-group shm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def maml_config(meta_batch: int, steps: int, inner_steps: int = 1) -> dict[str, Any]:
    return {"name": "scaling-maml", "seed": 0, "threads": 1,
            "data": {"dataset": "sinusoid", "options": {"shots": 5, "query_shots": 10, "meta_batch": meta_batch}},
            "model": {"trunk_hidden": [40, 40]},
            "training": {"algorithm": "maml", "algorithm_options": {"inner_lr": 0.01, "inner_steps": inner_steps},
                         "lr": 0.001, "max_steps": steps, "eval_every": steps, "patience": 0,
                         "meta_val_tasks": 100, "meta_test_tasks": 100}}


def _maml_worker(args: argparse.Namespace) -> float:
    from mtml.config import Config
    from mtml.engine import make_optimizer
    from mtml.engine._dist_steps import sharded_meta_step
    from mtml.meta import meta_parameters
    from mtml.workflows import build

    exp = build(Config.from_dict(maml_config(args.meta_batch, args.steps, args.inner_steps)))
    opt = make_optimizer("adam", meta_parameters(exp.algorithm, exp.model), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    seconds = _time(lambda: sharded_meta_step(exp.algorithm, exp.model, exp.family.train.sample(gen), opt),
                    args.warmup, args.steps)
    return args.meta_batch * args.steps / seconds


def _joint_worker(args: argparse.Namespace) -> float:
    from mtml.datasets import DATASETS
    from mtml.engine import TaskBatcher, make_optimizer
    from mtml.engine._dist_steps import sharded_joint_step
    from mtml.nn import build_multitask_model
    from mtml.weighting import WEIGHTINGS

    tasks = DATASETS.create("synthetic", num_tasks=args.joint_tasks, n_train=200, seed=0)
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=[64, 10], head_hidden=[])
    weighting = WEIGHTINGS.create(args.weighting, [t.name for t in tasks])
    opt = make_optimizer("adam", [*model.parameters(), *weighting.parameters()], lr=1e-3)
    batcher, gen, by_name = TaskBatcher(tasks, 64), torch.Generator().manual_seed(0), {t.name: t for t in tasks}
    seconds = _time(lambda: sharded_joint_step(model, by_name, batcher.sample(gen), weighting, opt), args.warmup,
                    args.steps)
    return args.joint_tasks * args.steps / seconds


def _time(step: Any, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` calls, all ranks starting together."""
    from mtml.engine._distributed import all_reduce_

    for _ in range(warmup):
        step()
    all_reduce_(torch.zeros(1))  # a barrier that works on one process too
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    all_reduce_(torch.zeros(1))
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    from mtml.engine._distributed import is_main, session

    torch.set_num_threads(1)
    with session():
        if "MTML_BENCH_START_AT" in os.environ:  # independent processes: start timing together
            time.sleep(max(0.0, float(os.environ["MTML_BENCH_START_AT"]) - time.time()))
        rate = _maml_worker(args) if args.workload == "maml" else _joint_worker(args)
        if is_main():
            print(json.dumps({"rate": rate}), flush=True)


def measure(workload: str, world: int, args: argparse.Namespace, reduce: str = "process-group") -> float:
    """Throughput of one run with ``world`` processes (fresh interpreters, one thread each)."""
    from mtml.engine._dist_launch import free_port

    port = free_port()
    cmd = [sys.executable, __file__, "--worker", "--workload", workload, *_shared(args)]
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MTML_DIST_REDUCE": reduce}
        # each worker in its own session, as torchrun and `mtml train --nproc` start them
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{workload} with {world} processes failed: {[p.returncode for p in procs]}")
    return float(json.loads(outs[0].strip().splitlines()[-1])["rate"])


def measure_independent(workload: str, world: int, args: argparse.Namespace) -> float:
    """Summed throughput of ``world`` processes that each train on ``1/world`` of the batch with NO process
    group (nothing is synchronised): the most that splitting the batch can give on this machine, whatever the
    communication. Only the MAML workload (the joint one splits tasks, not a batch size)."""
    part = argparse.Namespace(**{**vars(args), "meta_batch": args.meta_batch // world})
    cmd = [sys.executable, __file__, "--worker", "--workload", workload, *_shared(part)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MTML_BENCH_START_AT=str(time.time() + 8.0))
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
             for _ in range(world)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"independent {workload} processes failed: {[p.returncode for p in procs]}")
    return sum(float(json.loads(o.strip().splitlines()[-1])["rate"]) for o in outs)


def _shared(args: argparse.Namespace) -> list[str]:
    return ["--meta-batch", str(args.meta_batch), "--inner-steps", str(args.inner_steps),
            "--joint-tasks", str(args.joint_tasks), "--weighting",
            args.weighting, "--steps", str(args.steps), "--warmup", str(args.warmup)]


def e2e(world: int, args: argparse.Namespace, root: Path, i: int, reduce: str = "process-group") -> float:
    """Wall seconds of ``mtml train`` on the shipped sinusoid config (the MAML paper's protocol: meta-validation
    of 200 tasks every 1,000 steps, meta-test of 600 tasks at 0, 1 and 10 inner steps) at ``--meta-batch``
    tasks, ``--inner-steps`` and ``--e2e-steps`` steps: start-up, meta-training, validation, meta-test, plots."""
    sets = {"data.options.meta_batch": args.meta_batch, "training.max_steps": args.e2e_steps,
            "training.algorithm_options.inner_steps": args.inner_steps}
    cmd = [sys.executable, "-m", "mtml", "train", str(ROOT / "examples" / "configs" / "sinusoid.yaml"), "--quiet",
           "--out", str(root / f"run-{world}-{reduce}-{i}"),
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    subprocess.run([*cmd, *(["--nproc", str(world)] if world > 1 else [])], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MTML_DIST_REDUCE": reduce})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", choices=["maml", "joint"], default="maml")
    ap.add_argument("--workloads", nargs="*", default=["maml", "joint"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--meta-batch", type=int, default=100)
    ap.add_argument("--inner-steps", type=int, default=1, help="MAML inner steps (the sinusoid protocol: 1)")
    ap.add_argument("--joint-tasks", type=int, default=100)
    ap.add_argument("--weighting", default="equal")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e", action="store_true", help="also time whole `mtml train` runs")
    ap.add_argument("--independent", action="store_true",
                    help="also time N unsynchronised processes on 1/N of the meta-batch each (the upper bound)")
    ap.add_argument("--e2e-steps", type=int, default=300)
    ap.add_argument("--reduce", nargs="+", default=["process-group"], choices=["process-group", "shm"],
                    help="MTML_DIST_REDUCE of the N-process runs (several: each in every round, ratios printed)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    many = [(args.nproc, mode) for mode in args.reduce]
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; one thread per process; "
          f"{args.repeats} interleaved rounds; median shown", flush=True)
    for workload in args.workloads:
        rates: dict[tuple[int, str], list[float]] = {k: [] for k in [(1, "-"), *many]}
        for _ in range(args.repeats):
            for w, mode in rates:
                rates[(w, mode)].append(measure(workload, w, args, mode if w > 1 else "process-group"))
        unit = "tasks/s" if workload == "maml" else "task-batches/s"
        med = {k: statistics.median(v) for k, v in rates.items()}
        detail = "; ".join(f"{_label(k)}: " + ", ".join(f"{r:.0f}" for r in v) for k, v in rates.items())
        size = (f"meta-batch {args.meta_batch}, {args.inner_steps} inner" if workload == "maml"
                else f"{args.joint_tasks} tasks, {args.weighting}")
        ratios = ", ".join(f"{_label(k)} {med[k]:.0f} {unit} ({med[k] / med[(1, '-')]:.2f}x)" for k in many)
        print(f"{workload} ({size}): 1 proc {med[(1, '-')]:.0f} {unit}, {ratios}   [{detail}]", flush=True)
        if args.independent and workload == "maml":
            free = [measure_independent(workload, args.nproc, args) for _ in range(args.repeats)]
            bound = statistics.median(free)
            print(f"  bound: {args.nproc} independent processes of meta-batch {args.meta_batch // args.nproc}, no "
                  f"synchronisation: {bound:.0f} {unit} together, {bound / med[(1, '-')]:.2f}x one process  "
                  f"[{', '.join(f'{r:.0f}' for r in free)}]", flush=True)
    if args.e2e:
        _e2e_table(args, many)


def _label(key: tuple[int, str]) -> str:
    return "1 proc" if key[0] == 1 else f"{key[0]} procs {key[1]}"


def _e2e_table(args: argparse.Namespace, many: list[tuple[int, str]]) -> None:
    """Whole runs, 1 process and every N-process setting in each round (rounds alternate the order)."""
    keys = [(1, "-"), *many]
    secs: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for w, mode in (keys if i % 2 == 0 else keys[::-1]):
                secs[(w, mode)].append(e2e(w, args, Path(tmp), i, mode if w > 1 else "process-group"))
    med = {k: statistics.median(v) for k, v in secs.items()}
    detail = "; ".join(f"{_label(k)}: " + ", ".join(f"{t:.1f}" for t in v) for k, v in secs.items())
    parts = ", ".join(f"{_label(k)} {med[k]:.1f} s (speed-up {med[(1, '-')] / med[k]:.2f}x)" for k in many)
    versus = "".join(f"; {_label(k)} vs {_label(many[0])}: {med[many[0]] / med[k]:.2f}x" for k in many[1:])
    print(f"mtml train examples/configs/sinusoid.yaml ({args.e2e_steps} MAML steps, meta-batch {args.meta_batch}, "
          f"{args.inner_steps} inner, wall incl. start-up, load {os.getloadavg()[0]:.1f}): 1 proc "
          f"{med[(1, '-')]:.1f} s, {parts}{versus}   [{detail}]", flush=True)


if __name__ == "__main__":
    main()
