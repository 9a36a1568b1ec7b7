"""Elastic fault tolerance (issue 21), drilled for real on this machine: torchrun restarting a group whose
worker was SIGKILLed, SIGTERM (preemption) to a worker and to torchrun's agent, one of two agents standing in
for two nodes killed, and runs resumed on another number of ranks. Every drill ends by comparing the run with
one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from mtml.config import Config
from mtml.engine import _preempt as preempt
from mtml.engine import load_checkpoint
from mtml.engine._dist_launch import free_port
from mtml.engine._distributed import fresh_round
from mtml.errors import ConfigError, RunExistsError
from mtml.workflows import resume_run, train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drills use Linux process control")

MAML: dict[str, Any] = {
    "name": "elastic-maml", "seed": 0, "threads": 1,
    "data": {"dataset": "sinusoid", "options": {"shots": 5, "query_shots": 5, "meta_batch": 10}},
    "model": {"trunk_hidden": [16, 16]},
    "training": {"algorithm": "maml", "algorithm_options": {"inner_lr": 0.01, "inner_steps": 1,
                                                            "test_inner_steps": 2},
                 "lr": 0.003, "max_steps": 16, "eval_every": 4, "checkpoint_every": 2, "patience": 0,
                 "meta_val_tasks": 20, "meta_test_tasks": 30},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "MTML_DIST_TIMEOUT": "30"}


def _config(tmp: Path, **training: Any) -> Path:
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump({**MAML, "training": {**MAML["training"], **training}}))
    return path


def _reference(tmp: Path, **training: Any) -> Path:
    """The same config trained in one process, never interrupted."""
    out = tmp / "reference"
    train(Config.from_dict({**MAML, "training": {**MAML["training"], **training}}), out)
    return out


def assert_same_final_state(run: Path, reference: Path, step: int) -> None:
    name = f"step-{step:08d}.safetensors"
    for file in (name, "best.safetensors"):
        a, b = load_checkpoint(reference / "checkpoints" / file), load_checkpoint(run / "checkpoints" / file)
        assert a.tensors.keys() == b.tensors.keys()
        for key, value in a.tensors.items():
            if value.is_floating_point():
                torch.testing.assert_close(b.tensors[key], value, atol=1e-5, rtol=1e-4, msg=f"{file}: {key}")
    ref, got = (json.loads((p / "summary.json").read_text())["test"] for p in (reference, run))
    for task, scores in ref.items():
        for metric, value in scores.items():
            assert got[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_nothing_lost(run: Path, max_steps: int, eval_every: int) -> None:
    """Every validation and every logged training step is in metrics.jsonl, and the run says completed."""
    recs = records(run)
    assert {r["step"] for r in recs if r["kind"] == "val"} == set(range(eval_every, max_steps + 1, eval_every))
    assert {r["step"] for r in recs if r["kind"] == "train"} >= {1, *range(10, max_steps + 1, 10)}
    assert recs[-1]["kind"] == "done" and recs[-1]["step"] == max_steps
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def torchrun(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 240,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *map(str, args)], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, timeout=timeout)


def mtml(*args: str | Path, env: dict[str, str] | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


# -- a fresh rendezvous on every start -------------------------------------------------------------------
def test_fresh_round_gives_every_rank_one_new_prefix_despite_stale_keys() -> None:
    """torchrun keeps one store across restarts: keys a dead start left must not be taken by the next one."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=20))
    for r in (1, 2):  # what the ranks of a killed start left behind
        server.set(f"mtml/run/hello/{r}", f"old{r}")
        server.set(f"mtml/run/reply/old{r}", "stale")

    def start(world: int) -> dict[int, str]:
        got: dict[int, str] = {}

        def one(r: int) -> None:
            client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=20))
            if r == world - 1:
                time.sleep(0.2)  # rank 0 first sees this rank's stale hello
            got[r] = fresh_round(client, r, world, 20.0)

        threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return got

    first, second = start(3), start(3)
    assert len(set(first.values())) == 1 and len(first) == 3, first
    assert len(set(second.values())) == 1 and len(second) == 3, second
    assert first[0] != second[0] and "stale" not in first[0]


def test_fresh_round_names_the_ranks_that_never_came() -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    with pytest.raises(RuntimeError, match=r"rank\(s\) 1, 2 did not arrive within 0.3s"):
        fresh_round(server, 0, 3, 0.3)


@pytest.mark.slow
def test_torchrun_restarts_after_killed_workers_and_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """The drill of the issue: a worker SIGKILLed at a different step on each of k starts, under
    ``--max-restarts k``; the restarted groups join, continue from the last checkpoint by themselves, and the
    run ends with the parameters and meta-test scores of a run never interrupted."""
    cfg, out = _config(tmp_path), tmp_path / "run"
    t0 = time.monotonic()
    proc = torchrun("--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "2", "-m", "mtml", "train", cfg,
                    "--out", out, "--quiet", env={"MTML_FAULT_AT_STEP": "5,11"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("continuing the unfinished run") == 2, proc.stdout
    resumes = [r for r in records(out) if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [4, 10]  # the checkpoint before each kill: lost work < checkpoint_every
    assert json.loads((out / "run.json").read_text())["restarts"] == 2
    assert_nothing_lost(out, 16, 4)
    assert_same_final_state(out, _reference(tmp_path), 16)
    assert time.monotonic() - t0 < 200


# -- preemption ------------------------------------------------------------------------------------------
def test_a_stop_request_outside_a_training_loop_is_refused_so_the_signal_stops_at_once() -> None:
    assert not preempt.request_stop()
    with preempt.stop_window():
        assert preempt.request_stop() and preempt.requested() and preempt.vote() == 1.0
    with preempt.stop_window():
        assert not preempt.requested()  # a new loop starts with no request


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_the_step_on_every_rank_and_the_same_command_continues(
        tmp_path: Path) -> None:
    cfg, out = _config(tmp_path, checkpoint_every=8), tmp_path / "run"
    proc = mtml("train", cfg, "--nproc", "2", "--out", out, "--quiet",
                env={"MTML_FAULT_AT_STEP": "5", "MTML_FAULT_MODE": "term"})
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("terminated") == 1, proc.stderr
    assert "the same command continues it" in " ".join(proc.stderr.split())
    stopped = [r for r in records(out) if r["kind"] == "preempted"]
    assert len(stopped) == 1 and stopped[0]["step"] in (5, 6)  # the step of the signal, or the next one
    step = stopped[0]["step"]
    assert (out / "checkpoints" / f"step-{step:08d}.safetensors").is_file()  # not the last regular one
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    again = mtml("train", cfg, "--nproc", "2", "--out", out, "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"from its checkpoint at step {step}" in " ".join(again.stdout.split())
    assert_nothing_lost(out, 16, 4)
    assert_same_final_state(out, _reference(tmp_path, checkpoint_every=8), 16)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _wait_for_step(out: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob("step-*.safetensors")) if (out / "checkpoints").is_dir() else True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never wrote a checkpoint"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_checkpoints_then_the_same_command_resumes(tmp_path: Path) -> None:
    long = {"max_steps": 400_000, "eval_every": 200_000, "checkpoint_every": 50}
    cfg, out = _config(tmp_path, **long), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "-m", "mtml",
           "train", str(cfg), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_step(out, proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends; torchrun passes it on to its workers
    _, err = proc.communicate(timeout=90)
    stopped = [r for r in records(out) if r["kind"] == "preempted"]
    assert len(stopped) == 1, err[-3000:]
    assert (out / "checkpoints" / f"step-{stopped[0]['step']:08d}.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    # the same command continues from the preempted step (then is stopped the same way)
    again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while sum(r["kind"] == "resume" for r in records(out)) < 1:
        assert again.poll() is None, again.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert next(r for r in records(out) if r["kind"] == "resume")["step"] == stopped[0]["step"]
    again.send_signal(signal.SIGTERM)
    again.communicate(timeout=90)
    assert len([r for r in records(out) if r["kind"] == "preempted"]) == 2


@pytest.mark.slow
def test_one_of_two_agents_killed_the_other_exits_within_its_timeout_with_one_line(tmp_path: Path) -> None:
    """Two torchrun agents on 127.0.0.1 stand in for two nodes; node 1 (its agent and worker) is SIGKILLed."""
    long = {"max_steps": 400_000, "eval_every": 200_000, "checkpoint_every": 50}
    cfg, out, port = _config(tmp_path, **long), tmp_path / "run", free_port()

    def node() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                                 "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                                 f"drill-{port}", "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**ENV, "MTML_DIST_TIMEOUT": "20"})

    first = node()
    time.sleep(0.5)  # the first agent hosts the rendezvous store
    second = node()
    try:
        _wait_for_step(out, first)
        writer = first if any(p for p in _children(first.pid)) else second
        victim = second if writer is first else first
        for pid in [*_children(victim.pid), victim.pid]:
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = writer.communicate(timeout=60)
        assert time.monotonic() - t0 < 30, "the surviving node did not stop within its timeout"
        ours = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(ours) == 1 and "rank " in ours[0] and "failed" in ours[0], err[-3000:]
        # (torchrun's agent then prints its own ChildFailedError traceback: that one is torchrun's)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.communicate()


# -- another number of ranks -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_node_joining_an_elastic_run_continues_it_on_two_ranks_from_the_step_it_stopped(
        tmp_path: Path) -> None:
    """``--nnodes 1:2``: a node joining makes torchrun stop the running group (SIGTERM: a checkpoint of that
    step) and start one of two ranks, which continues the run. torchrun 2.13's shared store deadlocks on such
    a membership change (agents wait for a key nobody writes), hence TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as
    docs/distributed.md says."""
    long = {"max_steps": 400_000, "eval_every": 200_000, "checkpoint_every": 1000}
    cfg, out, port = _config(tmp_path, **long), tmp_path / "run", free_port()
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def node() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2",
                                 "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                 f"127.0.0.1:{port}", "--rdzv-id", f"grow-{port}", "--rdzv-conf",
                                 "last_call_timeout=1", "-m", "mtml", "train", str(cfg), "--out", str(out),
                                 "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    first = node()
    second = None
    try:
        _wait_for_step(out, first)
        second = node()
        deadline = time.monotonic() + 120
        while not any(r["kind"] == "resume" for r in records(out)):
            assert first.poll() is None and second.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the grown group never resumed"
            time.sleep(0.05)
        stopped = [r for r in records(out) if r["kind"] == "preempted"]
        resumed = [r for r in records(out) if r["kind"] == "resume"]
        assert len(stopped) == 1 and resumed[0]["step"] == stopped[0]["step"]  # no step lost
        deadline = time.monotonic() + 60
        while not [r for r in records(out) if r["kind"] == "train" and r["step"] > resumed[0]["step"]]:
            assert time.monotonic() < deadline, "the grown group did not train"
            time.sleep(0.05)
        assert _children(first.pid) and _children(second.pid)  # a worker on each "node"
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_a_one_process_run_killed_then_continued_on_two_ranks(tmp_path: Path) -> None:
    cfg, out = _config(tmp_path), tmp_path / "run"
    killed = mtml("train", cfg, "--out", out, "--quiet",
                  env={"MTML_FAULT_AT_STEP": "7", "MTML_FAULT_RANK": "0"})
    assert killed.returncode == -signal.SIGKILL
    assert max(int(p.name[5:13]) for p in (out / "checkpoints").glob("step-*")) == 6
    again = mtml("train", cfg, "--out", out, "--quiet", "--nproc", "2")
    assert again.returncode == 0, again.stderr
    assert "from its checkpoint at step 6" in " ".join(again.stdout.split())
    assert_nothing_lost(out, 16, 4)
    assert_same_final_state(out, _reference(tmp_path), 16)


def test_a_world_size_that_cannot_split_the_batch_is_refused_naming_the_sizes(tmp_path: Path) -> None:
    cfg, out = _config(tmp_path, max_steps=4), tmp_path / "run"
    proc = mtml("train", cfg, "--out", out, "--quiet", "--set", "data.options.meta_batch=2", "--nproc", "3")
    assert proc.returncode == 2, proc.stderr
    flat = " ".join(proc.stderr.split())
    assert "meta_batch" in flat and "2 cannot be split over 3 ranks" in flat, proc.stderr
    assert "Traceback" not in proc.stderr


# -- continuing by itself, and what it refuses -----------------------------------------------------------
def test_same_config_continues_an_unfinished_run_and_a_changed_one_is_refused_naming_the_keys(
        tmp_path: Path) -> None:
    config = Config.from_dict(MAML)
    out = tmp_path / "run"
    train(config, out)
    with pytest.raises(RunExistsError, match="has completed"):
        train(config, out)
    (out / "run.json").write_text(json.dumps({"status": "interrupted"}))
    said: list[str] = []
    again, result = train(config, out, announce=said.append)
    assert again.path == out and result.fit.steps == 16 and "from its checkpoint at step 16" in said[0]
    (out / "run.json").write_text(json.dumps({"status": "running"}))
    changed = Config.from_dict({**MAML, "training": {**MAML["training"], "lr": 0.01}})
    with pytest.raises(RunExistsError, match=r"different config \(training.lr: 0.003 -> 0.01\)"):
        train(changed, out)
    with pytest.raises(RunExistsError, match="already exists and is not empty"):
        train(config, out, auto_resume=False)
    (out / "run.json").write_text(json.dumps({"status": "diverged"}))
    with pytest.raises(RunExistsError, match="diverged"):
        train(config, out)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="not an mtml run directory"):
        train(config, stray)
    assert (stray / "notes.txt").read_text() == "mine"


def test_a_run_that_stopped_before_its_first_checkpoint_is_trained_again_in_place(tmp_path: Path) -> None:
    config = Config.from_dict(MAML)
    out = tmp_path / "run"
    train(config, out)
    for p in (out / "checkpoints").glob("step-*"):
        p.unlink()
    (out / "run.json").write_text(json.dumps({"status": "running"}))
    (out / "summary.json").unlink()
    said: list[str] = []
    _, result = train(config, out, announce=said.append)
    assert "from step 0" in said[0] and result.fit.steps == 16
    assert [r["kind"] for r in records(out)].count("restart") == 1


@pytest.mark.parametrize(("training", "out", "shown"), [
    ({}, None, "no --out was given"),
    ({"checkpoint_every": 16}, "run", "first checkpoint at its last step"),
    ({"checkpoint_every": None, "eval_every": 20}, "run", "first checkpoint at its last step"),
])
def test_torchrun_restarts_need_a_run_directory_and_a_checkpoint_before_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, training: dict[str, Any], out: str | None,
        shown: str) -> None:
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.chdir(tmp_path)
    config = Config.from_dict({**MAML, "training": {**MAML["training"], **training}})
    with pytest.raises(ConfigError, match=shown):
        train(config, out)
    assert not any(tmp_path.iterdir())  # refused before any directory was made


def test_resume_run_still_continues_explicitly(tmp_path: Path) -> None:
    config = Config.from_dict(MAML)
    train(config, tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"status": "interrupted"}))
    _, result = resume_run(tmp_path / "run")
    assert result.fit.steps == 16


# -- one trainer at a time -------------------------------------------------------------------------------
def test_a_run_being_trained_is_refused_to_a_second_trainer_and_free_once_its_trainer_is_killed(
        tmp_path: Path) -> None:
    """Continuing unfinished runs by themselves must not let two processes write one run (issue 17's lock)."""
    long = {"max_steps": 400_000, "eval_every": 200_000, "checkpoint_every": 50}
    cfg, out = _config(tmp_path, **long), tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_step(out, first)
        for args in (("train", cfg, "--out", out), ("train", "--resume", out)):
            second = mtml(*args, "--quiet")
            assert second.returncode == 2, second.stderr
            flat = " ".join(second.stderr.split())
            assert f"being trained by another process (pid {first.pid})" in flat and "Traceback" not in flat
        first.kill()  # SIGKILL: the kernel releases the lock
        first.communicate()
        assert json.loads((out / "run.json").read_text())["status"] == "running"
        later = subprocess.Popen([sys.executable, "-m", "mtml", "train", str(cfg), "--out", str(out), "--quiet"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.monotonic() + 60
        while not any(r["kind"] == "resume" for r in records(out)):
            assert later.poll() is None, later.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        later.send_signal(signal.SIGTERM)
        _, err = later.communicate(timeout=60)
        assert later.returncode == 143, err
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
