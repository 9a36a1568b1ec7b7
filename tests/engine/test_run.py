"""Run directories: refuse to overwrite, atomic writes, torn-line tolerant log, checkpoint pruning."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from torch import nn

from mtml.atomic import append_jsonl, atomic_write_bytes, atomic_write_text
from mtml.engine import Run, save_checkpoint
from mtml.errors import CheckpointError, RunExistsError


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_create_writes_config_and_status(tmp_path: Path) -> None:
    cfg = {"name": "x", "training": {"lr": 0.1, "hidden": [1, 2]}}
    run = Run.create(tmp_path / "r", cfg)
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == cfg
    assert run.config() == cfg
    status = run.status()
    assert status["status"] == "running" and "started" in status and "mtml_version" in status
    run.set_status("completed", finished=1.0)
    assert run.status()["status"] == "completed" and run.status()["started"] == status["started"]
    assert (run.path / "checkpoints").is_dir() and (run.path / "plots").is_dir()
    assert Run.open(run.path).config() == cfg


def test_create_in_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    Run.create(tmp_path / "empty", {})
    assert (tmp_path / "empty" / "config.yaml").is_file()


def test_create_refuses_a_non_empty_directory_and_leaves_it_alone(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {"a": 1})
    run.log({"kind": "train", "step": 1})
    before = {p: (run.path / p).read_bytes() for p in _all_files(run.path) if (run.path / p).is_file()}
    with pytest.raises(RunExistsError) as info:
        Run.create(tmp_path / "r", {"a": 2})
    assert str(tmp_path / "r") in str(info.value) and "--resume" in str(info.value)
    after = {p: (run.path / p).read_bytes() for p in _all_files(run.path) if (run.path / p).is_file()}
    assert before == after
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunExistsError):
        Run.create(tmp_path / "file", {})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError):
        Run.create(other, {})
    assert os.listdir(other) == ["notes.txt"]


def test_open_rejects_a_non_run(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an mtml run directory"):
        Run.open(tmp_path)
    (tmp_path / "config.yaml").write_text("a: [1,\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        Run.open(tmp_path).config()


def test_summary_round_trip_and_missing(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {})
    with pytest.raises(CheckpointError, match=r"has no summary.json.*--resume"):
        run.summary()
    run.write_summary({"test": {"a": {"mse": 0.5}}})
    assert run.summary() == {"test": {"a": {"mse": 0.5}}}


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {"a": 1})
    run.write_summary({"x": 1})
    run.set_status("completed")
    model = nn.Linear(2, 2)
    for step in (1, 2):
        save_checkpoint(run.step_checkpoint(step), modules={"model": model})
    save_checkpoint(run.best_checkpoint, modules={"model": model})
    names = _all_files(run.path)
    # (.lock is the run's lock file: one trainer at a time, released by the kernel when its holder ends)
    assert not [n for n in names if n.endswith(".tmp") or (Path(n).name.startswith(".") and n != ".lock")], names


def test_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
    atomic_write_text(tmp_path / "sub" / "new.txt", "made the folder")
    assert (tmp_path / "sub" / "new.txt").read_text() == "made the folder"


def test_records_skip_a_torn_last_line(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {})
    assert list(run.records()) == []
    for step in range(3):
        run.log({"kind": "train", "step": step, "loss": float("nan") if step == 1 else 0.5})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')  # a crash mid-line
    records = list(run.records())
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["loss"] != records[1]["loss"]  # NaN survives the round trip
    append_jsonl(run.path / "metrics.jsonl", {"kind": "resume", "step": 2})
    # the torn line and the new record share a line; the record after it is still readable
    run.log({"kind": "val", "step": 3})
    assert [r["kind"] for r in run.records()][-1] == "val"
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"kind": "train", "step": 0, "loss": 0.5}


def test_prune_keeps_newest_and_best(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {})
    model = nn.Linear(1, 1)
    for step in (5, 10, 15, 20, 100):
        save_checkpoint(run.step_checkpoint(step), modules={"model": model})
    save_checkpoint(run.best_checkpoint, modules={"model": model})
    (run.checkpoint_dir / "notes.txt").write_text("not a checkpoint")
    assert [s for s, _ in run.checkpoints()] == [5, 10, 15, 20, 100]  # numeric order
    run.prune_checkpoints(2)
    assert [s for s, _ in run.checkpoints()] == [20, 100]
    assert run.best_checkpoint.exists() and (run.checkpoint_dir / "notes.txt").exists()
    assert run.latest_checkpoint() == run.step_checkpoint(100)
    run.prune_checkpoints(5)
    assert [s for s, _ in run.checkpoints()] == [20, 100]
    run.prune_checkpoints(0)  # 0 keeps everything rather than deleting the only way to resume
    assert len(run.checkpoints()) == 2


def test_latest_checkpoint_of_an_empty_run(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {})
    assert run.latest_checkpoint() is None and run.checkpoints() == []


def test_resume_sweeps_temporaries_left_by_a_killed_write(tmp_path: Path) -> None:
    """A SIGKILL during an atomic write leaves ``.NAME.*.tmp``; the next resume removes the old ones only."""
    run = Run.create(tmp_path / "run", {"name": "x"})
    old = run.checkpoint_dir / ".step-00000010.safetensors.abc123.tmp"
    young = run.path / ".summary.json.def456.tmp"
    keep = run.checkpoint_dir / "step-00000005.safetensors"
    for path in (old, young, keep):
        path.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(keep, (an_hour_ago, an_hour_ago))
    assert run.sweep_temporaries() == [old]
    assert not old.exists() and young.exists() and keep.exists()
