"""Data-parallel training: real 2-process gloo groups over loopback (no mocks).

Equivalence: 2 ranks end with the same parameters (and optimiser state, and meta-test scores) as 1 process on
the same global batch, for MAML, ProtoNets and joint training with PCGrad. Faults: a rank that dies or hangs
makes the others stop within a bound with one clear error; the run resumes on another number of ranks.
Workers are forked from the test process (torch is already imported) except for the CLI tests, which start
``mtml train --nproc 2`` for real (workers forked by the launcher, and fresh interpreters with
``MTML_LAUNCH=spawn``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from mtml.config import Config
from mtml.engine import load_checkpoint
from mtml.engine._dist_launch import free_port
from mtml.engine._distributed import (
    DistributedError,
    map_ranks,
    rank,
    reduce_gradients,
    session,
    shard,
    world_size,
)
from mtml.errors import ConfigError
from mtml.workflows import TransferResult, evaluate_run, resume_run, train, train_seeds, transfer

MAML: dict[str, Any] = {
    "name": "dist-maml", "seed": 0, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 5, "query_shots": 5, "meta_batch": 10}},
    "model": {"trunk_hidden": [16, 16]},
    "training": {"algorithm": "maml", "algorithm_options": {"inner_lr": 0.01, "inner_steps": 1,
                                                            "test_inner_steps": 2},
                 "lr": 0.003, "max_steps": 8, "eval_every": 4, "patience": 0, "meta_val_tasks": 20,
                 "meta_test_tasks": 30},
}
PROTONET: dict[str, Any] = {
    "name": "dist-protonet", "seed": 1, "threads": 1,
    "data": {"dataset": "gaussian_classes", "options": {"classes": 30, "dim": 8, "examples": 10, "ways": 3,
                                                        "shots": 2, "query_shots": 3, "meta_batch": 5}},
    "model": {"trunk_hidden": [16]},
    "training": {"algorithm": "protonet", "lr": 0.01, "max_steps": 8, "eval_every": 4, "patience": 0,
                 "meta_val_tasks": 10, "meta_test_tasks": 15},
}
PCGRAD: dict[str, Any] = {
    "name": "dist-pcgrad", "seed": 2, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 4, "in_dim": 8, "latent_dim": 3, "n_train": 30,
                                                 "n_val": 15, "n_test": 15}},
    "model": {"trunk_hidden": [12]},
    "training": {"weighting": {"name": "pcgrad"}, "lr": 0.01, "batch_size": 11, "max_steps": 8, "eval_every": 4,
                 "patience": 0},
}
# one task on two ranks: each task's rows are split (with more tasks than ranks, whole tasks are)
ROWS: dict[str, Any] = {**PCGRAD, "name": "dist-rows",
                        "data": {"dataset": "synthetic", "options": {**PCGRAD["data"]["options"], "num_tasks": 1}},
                        "training": {**PCGRAD["training"], "weighting": {"name": "uncertainty"}}}
# tasks on shared rows (penguins: species + body mass): every rank takes its share of the group's rows
SHARED: dict[str, Any] = {
    "name": "dist-shared", "seed": 3, "threads": 1, "data": {"dataset": "penguins"},
    "model": {"trunk_hidden": [12]},
    "training": {"weighting": {"name": "mgda"}, "lr": 0.01, "batch_size": 33, "max_steps": 8, "eval_every": 4,
                 "patience": 0},
}
# accumulation, clipping and a schedule: each micro-batch's gradient is all-reduced, so the ranks clip the same sum
MAML_UPDATES: dict[str, Any] = {**MAML, "name": "dist-maml-updates", "training": {
    **MAML["training"], "accumulate": 2, "grad_clip": 0.5, "scheduler": {"name": "cosine", "warmup": 2}}}
PCGRAD_UPDATES: dict[str, Any] = {**PCGRAD, "name": "dist-pcgrad-updates", "training": {
    **PCGRAD["training"], "accumulate": 3, "grad_clip": 0.2, "scheduler": {"name": "step", "every": 3}}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


# -- running ranks ---------------------------------------------------------------------------------------
def _worker(fn: Callable[..., Any], r: int, world: int, port: int, env: dict[str, str], queue: Any,
            args: tuple[Any, ...]) -> None:
    os.environ.update({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env})
    torch.set_num_threads(1)
    t0 = time.monotonic()
    try:
        queue.put((r, "ok", fn(*args), time.monotonic() - t0))
    except BaseException as exc:  # report, never hang the parent
        queue.put((r, type(exc).__name__, str(exc), time.monotonic() - t0))


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2, env: dict[str, str] | None = None,
              timeout: float = 60.0, needed: list[int] | None = None) -> list[tuple[str, Any, float]]:
    """``fn(*args)`` on ``world`` forked ranks of one gloo group; ``(status, result or message, seconds)``
    per rank, in rank order. Waits for the ``needed`` ranks (default all); a rank that never reports gets
    ``("lost", None, nan)`` and is killed."""
    needed = list(range(world)) if needed is None else needed
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, env or {}, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple[str, Any, float]] = {}
    deadline = time.monotonic() + timeout
    while not set(needed) <= set(out) and time.monotonic() < deadline:
        if all(not p.is_alive() for p in procs) and queue.empty():
            break
        try:
            r, status, value, seconds = queue.get(timeout=0.2)
            out[r] = (status, value, seconds)
        except Exception:  # queue.Empty
            continue
    for r, p in enumerate(procs):
        p.join(5 if r in out else 0)
        if p.is_alive():
            p.kill()
            p.join()
    return [out.get(r, ("lost", None, float("nan"))) for r in range(world)]


def _train(config: dict[str, Any], out: str) -> dict[str, Any]:
    _, result = train(Config.from_dict(config), out)
    return result.test


def assert_same_checkpoints(a: Path, b: Path, atol: float = 1e-5) -> None:
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (b / "checkpoints").iterdir())
    for name in names:
        ca, cb = load_checkpoint(a / "checkpoints" / name), load_checkpoint(b / "checkpoints" / name)
        assert ca.tensors.keys() == cb.tensors.keys()
        for key, value in ca.tensors.items():
            other = cb.tensors[key]
            if value.is_floating_point():
                torch.testing.assert_close(other, value, atol=atol, rtol=1e-4, msg=f"{name}: {key}")
            else:
                assert torch.equal(other, value), (name, key)
        assert ca.meta["step"] == cb.meta["step"]


def assert_close_scores(a: dict[str, Any], b: dict[str, Any]) -> None:
    for task, scores in a.items():
        for metric, value in scores.items():
            assert b[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)


# -- equivalence -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "mode"), [(MAML, "shm"), (MAML, "process-group"), (PROTONET, "shm"),
                                             (PCGRAD, None), (ROWS, "shm"), (SHARED, None), (MAML_UPDATES, None),
                                             (PCGRAD_UPDATES, "shm")],
                         ids=["maml-shm", "maml-gloo", "protonet", "joint-pcgrad", "joint-rows-uncertainty",
                              "joint-shared-rows-mgda", "maml-accumulate-clip-cosine",
                              "joint-pcgrad-accumulate-clip-step"])
def test_two_ranks_end_with_the_parameters_of_one_process(tmp_path: Path, config: dict[str, Any],
                                                          mode: str | None) -> None:
    one = _train(config, str(tmp_path / "one"))
    ranks = run_ranks(_train, config, str(tmp_path / "two"), env={"MTML_DIST_REDUCE": mode} if mode else {})
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two")
    for _, scores, _ in ranks:  # every rank gets the gathered meta-test / test scores
        assert_close_scores(one, scores)
    two = tmp_path / "two"
    assert json.loads((two / "run.json").read_text())["status"] == "completed"
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "done" for r in logged) == 1  # one rank wrote the log
    if "grad_clip" in config["training"]:  # the clipping updater ran (its norm is logged)
        assert all("grad_norm" in r for r in logged if r["kind"] == "train")


# -- helpers on 2 ranks ----------------------------------------------------------------------------------
def _helpers() -> dict[str, Any]:
    with session():
        drawn: list[int] = []

        def lazily() -> Any:
            for i in range(7):
                drawn.append(i)
                yield i

        # the true rank, and what mtml sees inside a job: one process
        squares = map_ranks(lambda i: (i * i, dist.get_rank(), world_size()), lazily())
        p = torch.nn.Parameter(torch.zeros(3))
        q = torch.nn.Parameter(torch.zeros(2))  # gets a gradient on rank 1 only
        r_ = torch.nn.Parameter(torch.zeros(1))  # on no rank
        p.grad = torch.full((3,), float(rank() + 1))
        if rank() == 1:
            q.grad = torch.ones(2)
        extra = reduce_gradients([p, q, r_], torch.tensor([float(rank())]))
        return {"squares": squares, "drawn": drawn, "shards": [shard(n) for n in (2, 5)], "world": world_size(),
                "p": p.grad.tolist(), "q": q.grad.tolist() if q.grad is not None else None,
                "r": r_.grad, "extra": extra.tolist() if extra is not None else None}


@pytest.mark.parametrize("mode", [None, "shm", "process-group"], ids=["default", "shm", "process-group"])
def test_map_ranks_shard_and_gradient_reduction_on_two_ranks(mode: str | None) -> None:
    ranks = run_ranks(_helpers, env={"MTML_DIST_REDUCE": mode} if mode else {})
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    for r, (_, got, _) in enumerate(ranks):
        assert got["world"] == 2
        assert [s for s, _, _ in got["squares"]] == [i * i for i in range(7)]
        assert [owner for _, owner, _ in got["squares"]] == [i % 2 for i in range(7)]  # spread over both ranks
        assert {inside for _, _, inside in got["squares"]} == {1}  # a job runs alone on its rank
        assert got["drawn"] == list(range(7))  # every rank walked the whole iterable
        assert got["shards"] == ([slice(0, 1), slice(0, 3)] if r == 0 else [slice(1, 2), slice(3, 5)])
        assert got["p"] == [3.0, 3.0, 3.0] and got["q"] == [1.0, 1.0] and got["r"] is None
        assert got["extra"] == [1.0]


def _stop_vote() -> dict[str, Any]:
    """Rank 1 alone asks to stop; both ranks must learn it from the gradient all-reduce itself."""
    from mtml.engine import _preempt as preempt
    from mtml.engine._distributed import stop_agreed

    with session(), preempt.stop_window():
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        before = preempt.tallies()
        reduce_gradients([p], torch.tensor([1.0]))  # a quiet step first: nobody stops
        quiet = stop_agreed(before)
        if rank() == 1:
            assert preempt.request_stop()
        before = preempt.tallies()
        p.grad = torch.ones(2)
        extra = reduce_gradients([p], torch.tensor([2.0]))
        voted = preempt.tallies() - before  # 1: the vote rode this all-reduce
        agreed = stop_agreed(before)
        return {"quiet": quiet, "voted": voted, "agreed": agreed, "extra": extra.tolist() if extra is not None
                else None, "grad": p.grad.tolist(), "after": preempt.tallies() - before}


def test_a_stop_request_on_one_rank_reaches_every_rank_through_the_gradient_all_reduce() -> None:
    ranks = run_ranks(_stop_vote)
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    for _, got, _ in ranks:
        assert got["quiet"] is False and got["agreed"] is True
        assert got["voted"] == 1 and got["after"] == 1  # no stop-vote all-reduce of its own was needed
        assert got["extra"] == [4.0] and got["grad"] == [2.0, 2.0]  # the vote did not shift the other sums


def test_helpers_are_no_ops_in_one_process() -> None:
    assert world_size() == 1 and rank() == 0
    assert map_ranks(lambda x: x + 1, iter([1, 2])) == [2, 3]
    assert shard(5) == slice(0, 5)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    extra = torch.tensor([4.0])
    assert reduce_gradients([p], extra) is extra and p.grad.tolist() == [1.0, 1.0]


def _shard_too_small() -> str:
    with session():
        try:
            shard(1, "tasks per episode (meta_batch)")
        except ConfigError as exc:
            return str(exc)
    return ""


def test_too_few_items_for_the_ranks_is_a_config_error() -> None:
    ranks = run_ranks(_shard_too_small)
    assert all(r[0] == "ok" and "meta_batch" in r[1] and "2 ranks" in r[1] for r in ranks), ranks


# -- the shared-memory all-reduce (MTML_DIST_REDUCE=shm, opt-in) -----------------------------------------
def _own_files() -> list[str]:
    """This rank's shared-memory files (named after the creating pid, so other test runs do not interfere)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"mtml-reduce-{os.getpid()}-*"))


def _sums() -> dict[str, Any]:
    """Many all-reduces of changing sizes and dtypes (both buffers reused many times, ranks arriving in
    changing orders), and tensors of several slots (chunked), each checked against the exact sum in rank order
    on every rank."""
    import mtml.engine._distributed as d

    with session():
        shared = d._shared()
        w, r = world_size(), rank()
        exact, bits = True, []
        sizes = [1 + (k * 37) % 3000 for k in range(200)] + [0, 65_536, 65_537, 150_001]
        for k, n in enumerate(sizes):
            dtype = torch.float64 if k % 3 == 0 else torch.float32
            if (k + r) % 7 == 0:
                time.sleep(0.001)  # this rank arrives late: the others wait, post early, and must not race ahead
            g = torch.Generator().manual_seed(k)
            parts = [torch.randn(n, generator=g, dtype=dtype) for _ in range(w)]
            got = d.all_reduce_(parts[r].clone())
            want = parts[0].clone()
            for p in parts[1:]:
                want += p
            exact &= torch.equal(got, want)
            bits.append(float(got.double().sum()))
        ints = d.all_reduce_(torch.arange(5, dtype=torch.int64) * (r + 1))
        big = torch.full((100_000,), float(r + 1))  # 400 kB: two chunks
        d.all_reduce_(big)
        return {"shared": shared is not None, "exact": exact, "bits": bits, "big": float(big[0]),
                "ints": ints.tolist(), "leftover": _own_files()}


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_all_reduce_is_exact_and_leaves_no_file(world: int) -> None:
    ranks = run_ranks(_sums, world=world, env={"MTML_DIST_REDUCE": "shm"})
    assert [r[0] for r in ranks] == ["ok"] * world, ranks
    results = [r[1] for r in ranks]
    assert all(x["shared"] and x["exact"] for x in results)
    assert all(x["bits"] == results[0]["bits"] for x in results)  # the same bits on every rank
    assert all(x["big"] == world * (world + 1) / 2 and x["leftover"] == [] for x in results)
    assert all(x["ints"] == [i * world * (world + 1) // 2 for i in range(5)] for x in results)


def _mismatched(kind: str) -> str:
    import mtml.engine._distributed as d

    with session():
        r = rank()
        tensor = torch.ones(3 + r) if kind == "size" else torch.ones(4, dtype=torch.float64 if r else torch.float32)
        try:
            d.all_reduce_(tensor)
        except DistributedError as exc:
            return str(exc)
    return "summed"


@pytest.mark.parametrize(("kind", "shown"), [("size", "rank 0: 3 float32, rank 1: 4 float32"),
                                             ("dtype", "rank 0: 4 float32, rank 1: 4 float64")])
def test_ranks_passing_different_sizes_or_dtypes_all_fail_before_summing(kind: str, shown: str) -> None:
    ranks = run_ranks(_mismatched, kind, env={"MTML_DIST_REDUCE": "shm", "MTML_DIST_TIMEOUT": "20"}, timeout=40)
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    for r, (_, message, seconds) in enumerate(ranks):
        assert f"rank {r} of 2" in message and "different tensors" in message and shown in message, message
        assert seconds < 15  # found at once, not at the timeout


def _peer_dies_in_set_up() -> tuple[str, list[str]]:
    import mtml.engine._distributed as d
    import mtml.engine._shm_reduce as s

    if os.environ["RANK"] == "1":
        s.SharedReducer.attach = lambda *args: os._exit(3)  # type: ignore[assignment,method-assign]
    with session():
        try:
            d.all_reduce_(torch.ones(2))
        except DistributedError as exc:
            return str(exc), _own_files()
    return "summed", _own_files()


def test_a_rank_dying_during_set_up_leaves_no_file_in_dev_shm() -> None:
    ranks = run_ranks(_peer_dies_in_set_up, env={"MTML_DIST_REDUCE": "shm", "MTML_DIST_TIMEOUT": "20"},
                      timeout=40, needed=[0])
    status, (message, leftover), _ = ranks[0]
    assert status == "ok" and "setting up the shared-memory all-reduce failed" in message, ranks
    assert leftover == []  # rank 0 created the file, its peer died before mapping it: unlinked in `finally`
    assert ranks[1][0] == "lost"


def _no_dev_shm() -> str:
    import mtml.engine._distributed as d
    import mtml.engine._shm_reduce as s

    s.SHM_DIR = Path("/nonexistent-mtml-shm")  # a machine without /dev/shm: no fallback to /tmp
    with session():
        try:
            d.all_reduce_(torch.ones(2))
        except DistributedError as exc:
            return str(exc)
    return "summed"


def test_shared_memory_needs_dev_shm_and_says_so_on_every_rank() -> None:
    ranks = run_ranks(_no_dev_shm, env={"MTML_DIST_REDUCE": "shm"})
    assert all(r[0] == "ok" and "MTML_DIST_REDUCE=shm" in r[1] and "/nonexistent-mtml-shm is not a writable "
               "directory" in r[1] for r in ranks), ranks


def _reduce_once() -> float:
    with session():
        return float(reduce_gradients([], torch.ones(1))[0])  # type: ignore[index]


def _mixed_modes(modes: tuple[str | None, str | None]) -> tuple[float, bool]:
    import mtml.engine._distributed as d

    mode = modes[int(os.environ["RANK"])]
    if mode is None:
        os.environ.pop("MTML_DIST_REDUCE", None)
    else:
        os.environ["MTML_DIST_REDUCE"] = mode
    with session():
        total = _reduce_once()
        return total, d._shared() is not None


@pytest.mark.parametrize(("modes", "shared"), [(("process-group", "shm"), False), ((None, "shm"), False),
                                               (("shm", "process-group"), True), ((None, None), False)],
                         ids=["gloo-shm", "unset-shm", "shm-gloo", "default"])
def test_ranks_started_with_different_reduce_modes_follow_rank_0(modes: tuple[str | None, str | None],
                                                                 shared: bool) -> None:
    ranks = run_ranks(_mixed_modes, modes, timeout=30)
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    assert all(r[1] == (2.0, shared) for r in ranks), ranks  # the process group unless rank 0 opts in


@pytest.mark.parametrize(("value", "extra"), [("fast", ""), ("auto", "auto was removed")])
def test_a_bad_reduce_mode_is_a_config_error(value: str, extra: str) -> None:
    ranks = run_ranks(_reduce_once, env={"MTML_DIST_REDUCE": value})
    assert all(r[0] == "ConfigError" and f"MTML_DIST_REDUCE must be one of process-group, shm. Got {value!r}" in r[1]
               and extra in r[1] for r in ranks), ranks


# -- faults ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shm", "process-group"])
def test_a_hung_rank_makes_the_others_fail_within_the_timeout(tmp_path: Path, mode: str) -> None:
    config = {**MAML, "training": {**MAML["training"], "max_steps": 30}}
    env = {"MTML_FAULT_AT_STEP": "3", "MTML_FAULT_MODE": "hang", "MTML_DIST_TIMEOUT": "3", "MTML_DIST_REDUCE": mode}
    t0 = time.monotonic()
    ranks = run_ranks(_train, config, str(tmp_path / "run"), env=env, timeout=60, needed=[0])
    status, message, seconds = ranks[0]
    assert status == DistributedError.__name__, ranks
    assert "rank 0 of 2" in message and "MTML_DIST_TIMEOUT=3s" in message and "--resume" in message
    assert seconds < 30 and time.monotonic() - t0 < 45
    assert ranks[1][0] == "lost"  # the hung rank never finished; run_ranks killed it


def mtml(*args: str | Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def test_cli_rank_killed_then_resume_on_one_rank(tmp_path: Path) -> None:
    config = {**MAML, "training": {**MAML["training"], "checkpoint_every": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    proc = mtml("train", path, "--nproc", "2", "--out", tmp_path / "run", "--quiet",
                env={"MTML_FAULT_AT_STEP": "5", "MTML_DIST_TIMEOUT": "30"})
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    flat = " ".join(proc.stderr.split())
    assert "2-rank run failed: rank 1 was killed by SIGKILL" in flat, proc.stderr
    assert f"mtml train --resume {tmp_path / 'run'}" in flat
    assert elapsed < 90, elapsed  # not the 30 s collective timeout, let alone 30 min
    steps = [int(p.name[5:13]) for p in (tmp_path / "run" / "checkpoints").glob("step-*")]
    assert max(steps) == 4  # the checkpoint before the fault
    # resume the 2-rank run on 1 rank: it ends where an uninterrupted 1-process run ends
    resume_run(tmp_path / "run")
    _train(config, str(tmp_path / "one"))
    for name in ("step-00000008.safetensors", "best.safetensors"):
        a = load_checkpoint(tmp_path / "one" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "run" / "checkpoints" / name)
        for key, value in a.tensors.items():
            if value.is_floating_point():
                torch.testing.assert_close(b.tensors[key], value, atol=1e-5, rtol=1e-4)
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in kinds and kinds[-1] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cli_nproc_two_end_to_end(tmp_path: Path, method: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(PCGRAD))
    proc = mtml("train", path, "--nproc", "2", "--out", tmp_path / "run", "--quiet", env={"MTML_LAUNCH": method})
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.count("run directory:") == 1  # only rank 0 prints
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "plots/learning_curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    _train(PCGRAD, str(tmp_path / "one"))
    assert_same_checkpoints(tmp_path / "one", tmp_path / "run")
    again = mtml("train", path, "--nproc", "2", "--out", tmp_path / "run", "--quiet")
    assert again.returncode == 2 and again.stderr.count("already exists") == 1, again.stderr  # said once


# -- embarrassingly parallel jobs ------------------------------------------------------------------------
def _seeds(config: dict[str, Any], root: str) -> list[tuple[str, dict[str, Any]]]:
    return [(str(path), summary) for path, summary in train_seeds(Config.from_dict(config), [0, 1, 2], root)]


def test_seeds_spread_over_ranks_match_one_process(tmp_path: Path) -> None:
    one = _seeds(PROTONET, str(tmp_path / "one"))
    ranks = run_ranks(_seeds, PROTONET, str(tmp_path / "two"))
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    assert ranks[0][1] == ranks[1][1]  # every rank gets every seed's result
    for (path_a, a), (path_b, b) in zip(one, ranks[0][1], strict=True):
        assert Path(path_a).name == Path(path_b).name
        assert a["test"] == b["test"] and a["best_step"] == b["best_step"]
        assert_same_checkpoints(Path(path_a), Path(path_b), atol=0.0)  # each seed ran alone on one rank


TRANSFER_SOURCE: dict[str, Any] = {
    "name": "dist-tr-source", "seed": 0, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 2, "n_train": 30,
                                                 "n_val": 20, "n_test": 40}},
    "model": {"trunk_hidden": [6, 4]},
    "training": {"lr": 0.01, "batch_size": 16, "max_steps": 20, "eval_every": 10, "patience": 0},
}
TRANSFER_FAST = {n: {"steps": 10} for n in ("scratch", "finetune_head", "l2sp")}


def _transfer_target(root: Path) -> Path:
    options = {**TRANSFER_SOURCE["data"]["options"], "num_tasks": 2, "seed": 5}
    path = root / "target.yaml"
    path.write_text(yaml.safe_dump({"name": "dist-tr-target", "seed": 1, "threads": 1,
                                    "data": {"dataset": "synthetic", "options": options}}))
    return path


def _transfer(source: str, target: str, out: str) -> tuple[dict[str, Any], dict[str, Any]]:
    result: TransferResult = transfer(source, target, strategies=[*TRANSFER_FAST, "linear_probe"],
                                      sizes=[2, 5, "all"], repeats=3, options=TRANSFER_FAST, out=out)
    return result.scores, result.gains


def test_transfer_draws_spread_over_ranks_match_one_process(tmp_path: Path) -> None:
    train(Config.from_dict(TRANSFER_SOURCE), tmp_path / "source")
    target = _transfer_target(tmp_path)
    one = _transfer(str(tmp_path / "source"), str(target), str(tmp_path / "one"))
    ranks = run_ranks(_transfer, str(tmp_path / "source"), str(target), str(tmp_path / "two"), timeout=120)
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    assert ranks[0][1] == ranks[1][1] == one  # every rank returns the whole result, the same as one process
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "transfer.json").read_text())["scores"] == json.loads(
        (tmp_path / "one" / "transfer.json").read_text())["scores"]


@pytest.mark.slow
def test_cli_transfer_nproc_two(tmp_path: Path) -> None:
    train(Config.from_dict(TRANSFER_SOURCE), tmp_path / "source")
    target = _transfer_target(tmp_path)
    scores, _ = _transfer(str(tmp_path / "source"), str(target), str(tmp_path / "one"))
    options = [a for name, opts in TRANSFER_FAST.items() for a in ("--option", f"{name}.steps={opts['steps']}")]
    args = ["transfer", tmp_path / "source", "--target", target, "--strategies",
            ",".join([*TRANSFER_FAST, "linear_probe"]), "--sizes", "2,5,all", "--repeats", "3", *options]
    proc = mtml(*args, "--out", tmp_path / "two", "--nproc", "2")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.count("written to") == 1  # only rank 0 prints
    assert json.loads((tmp_path / "two" / "transfer.json").read_text())["scores"] == scores
    again = mtml(*args, "--out", tmp_path / "two", "--nproc", "2")
    assert again.returncode == 2 and again.stderr.count("exists and is not empty") == 1, again.stderr


def _evaluate(path: str, options: dict[str, int]) -> dict[str, Any]:
    return evaluate_run(path, "test", **options)


@pytest.mark.parametrize(("config", "options"), [(MAML, {"num_tasks": 50, "steps": 3}), (PCGRAD, {})],
                         ids=["meta-test", "joint-test"])
def test_evaluate_run_spread_over_ranks_matches_one_process(tmp_path: Path, config: dict[str, Any],
                                                            options: dict[str, int]) -> None:
    path = str(tmp_path / config["name"])
    train(Config.from_dict(config), path)
    one = _evaluate(path, options)
    ranks = run_ranks(_evaluate, path, options)
    assert [r[0] for r in ranks] == ["ok", "ok"], ranks
    assert ranks[0][1] == ranks[1][1] == one  # the same numbers, gathered in episode (task) order


@pytest.mark.slow
def test_cli_eval_nproc_two(tmp_path: Path) -> None:
    train(Config.from_dict(MAML), tmp_path / "run")
    proc = mtml("eval", tmp_path / "run", "--tasks", "40", "--nproc", "2")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.count("meta-test over 40 held-out tasks") == 1  # only rank 0 prints
    bad = mtml("eval", tmp_path / "run", "--tasks", "0", "--nproc", "2")
    assert bad.returncode == 2 and bad.stderr.count("--tasks must be >= 1") == 1, bad.stderr
    missing = mtml("eval", tmp_path / "nope", "--nproc", "2")
    assert missing.returncode == 2 and missing.stderr.count("is not an mtml run directory") == 1, missing.stderr
