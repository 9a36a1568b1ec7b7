"""``mtml sweep``: trials against their own run directories, pruning, exactly N trials in parallel, a SIGKILL
mid-trial resumed with no trial lost or run twice, the report of a sweep, and bad searches refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("optuna")

from mtml.errors import ConfigError
from mtml.workflows import parse_param, sweep

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
BASE: dict[str, Any] = {
    "name": "sweep", "seed": 0, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 2, "n_train": 40,
                                                 "n_val": 20, "n_test": 20}},
    "model": {"trunk_hidden": [6]},
    "training": {"weighting": "equal", "lr": 0.01, "batch_size": 10, "max_steps": 60, "eval_every": 10,
                 "patience": 0},
}
LR = "training.lr=log:1e-3:1e-1"
HIDDEN = "model.trunk_hidden=choice:[[4],[8]]"


def mtml(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False))
    return path


def _trials(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "trials.json").read_text())


def test_param_forms() -> None:
    p = parse_param("training.lr=log:1e-4:1e-2")
    assert (p.kind, p.low, p.high) == ("log", 1e-4, 1e-2) and p.distribution().log  # type: ignore[attr-defined]
    q = parse_param("training.batch_size=int:8:64:8")
    assert q.distribution().step == 8 and q.examples() == [8, 64]  # type: ignore[attr-defined]
    c = parse_param("model.trunk_hidden=choice:[[32],[64, 64]]")
    assert c.choices == ([32], [64, 64]) and c.encoded and c.value(json.dumps([64, 64])) == [64, 64]
    s = parse_param("training.optimizer=choice:adam,sgd")
    assert s.choices == ("adam", "sgd") and not s.encoded


@pytest.mark.parametrize(("text", "says"), [
    ("training.lr=log:1e-2:1e-4", "LOW 0.01 is above HIGH 0.0001"),
    ("training.lr=log:0:1e-2", "needs LOW > 0"),
    ("training.lr=uniform:0:1", "unknown form 'uniform'"),
    ("training.batch_size=int:8.5:64", "whole numbers"),
    ("training.lr=float:a:b", "must be numbers"),
    ("training.lr=float:0:1:-1", "STEP must be > 0"),
    ("training.optimizer=choice:adam,adam", "listed twice"),
    ("training.lr", "expected KEY=FORM"),
])
def test_bad_forms_are_refused_naming_the_fix(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        parse_param(text)


def test_a_sweep_trains_each_trial_as_its_own_run(config: Path, tmp_path: Path) -> None:
    result = sweep(config, [LR, HIDDEN], trials=5, out=tmp_path / "s", prune=False)
    rows = _trials(tmp_path / "s")
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4] and {r["state"] for r in rows} == {"complete"}
    for r in rows:  # the trial's value is its run's best validation objective, its parameters the run's config
        run = tmp_path / "s" / r["run"]
        summary = json.loads((run / "summary.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert r["value"] == pytest.approx(summary["best_objective"], rel=1e-12)
        assert cfg["training"]["lr"] == pytest.approx(r["training.lr"]) and 1e-3 <= r["training.lr"] <= 1e-1
        assert cfg["model"]["trunk_hidden"] == r["model.trunk_hidden"] in ([4], [8])
        assert r["best_step"] == summary["best_step"]
    assert result.best is not None and result.best["value"] == min(r["value"] for r in rows)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["best"]["trial"] == result.best["trial"] and summary["counts"] == {"complete": 5}
    assert {p.name for p in (tmp_path / "s" / "plots").iterdir()} == {"sweep_history.png", "sweep_params.png"}
    # the same command again: the sweep is full, nothing is trained again; more trials continue it
    again = sweep(config, [LR, HIDDEN], trials=5, out=tmp_path / "s", prune=False)
    assert len(again.trials) == 5
    more = sweep(config, [LR, HIDDEN], trials=6, out=tmp_path / "s", prune=False)
    assert [r["trial"] for r in more.trials] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="holds another sweep"):
        sweep(config, [LR], trials=6, out=tmp_path / "s", prune=False)


def test_pruning_stops_bad_trials_at_a_validation(config: Path, tmp_path: Path) -> None:
    # a wide learning-rate range: the low rates are far behind the median at early validations
    result = sweep(config, ["training.lr=log:1e-5:1e-1"], trials=10, out=tmp_path / "p",
                   overrides=["training.max_steps=100"])
    pruned = [r for r in result.trials if r["state"] == "pruned"]
    assert pruned, result.trials
    for r in pruned:
        run = tmp_path / "p" / r["run"]
        assert json.loads((run / "run.json").read_text())["status"] == "pruned"
        vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = max(v["step"] for v in vals if v.get("kind") == "val")
        assert last < 100 and not (run / "summary.json").exists()


def test_report_of_a_sweep(config: Path, tmp_path: Path) -> None:
    sweep(config, [LR], trials=3, out=tmp_path / "s", prune=False)
    proc = mtml("report", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "s" / "report.html").read_text()
    assert "<h2>Sweep s</h2>" in page and page.count("<tr>") >= 4 and "trial-0002" in page
    assert page.count("data:image/png;base64,") >= 3  # the sweep's two plots and the best trials' plots


@pytest.mark.slow
def test_two_workers_make_exactly_the_trials_asked(config: Path, tmp_path: Path) -> None:
    proc = mtml("sweep", config, "--param", LR, "--param", HIDDEN, "--trials", "5", "--nproc", "2", "--out",
                tmp_path / "w", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    rows = _trials(tmp_path / "w")
    assert sorted(r["trial"] for r in rows) == [0, 1, 2, 3, 4] and {r["state"] for r in rows} == {"complete"}
    assert len(list((tmp_path / "w").glob("trial-*"))) == 5
    assert proc.stdout.count("→ objective") == 5


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_loses_no_trial(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "k"
    args = ["sweep", config, "--param", LR, "--trials", "8", "--out", out, "--no-prune",
            "--set", "training.max_steps=400", "--set", "training.eval_every=20"]
    proc = subprocess.Popen([sys.executable, "-m", "mtml", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    victim = out / "trial-0002" / "checkpoints"
    while time.time() < deadline and not list(victim.glob("step-*.safetensors")):
        time.sleep(0.05)
    assert list(victim.glob("step-*.safetensors")), "trial 2 never wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-trial: trial 2 has a checkpoint and is not finished
    proc.wait(timeout=30)
    killed_at = max(int(p.stem.split("-")[1]) for p in victim.glob("step-*.safetensors"))
    assert killed_at < 400
    done = mtml(*args)
    assert done.returncode == 0, done.stderr
    rows = _trials(out)
    assert sorted(r["trial"] for r in rows) == list(range(8)) and {r["state"] for r in rows} == {"complete"}
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{i:04d}" for i in range(8)]
    records = [json.loads(line) for line in (out / "trial-0002" / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("kind") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 20  # continued from its checkpoint, not from step 0
    assert "continued from its checkpoint" in done.stdout


@pytest.mark.parametrize(("extra", "says"), [
    (["--param", "training.lr=log:1e-2:1e-4"], "is above HIGH"),
    (["--param", "training.lrr=log:1e-4:1e-2"], "training.lrr"),
    (["--param", "training.batch_size=int:0:8"], "--param training.batch_size=0 does not make a valid config"),
    (["--param", "training.lr=log:1e-4:1e-2", "--trials", "0"], "--trials must be >= 1"),
    ([], "give at least one --param"),
    (["--param", "training.lr=log:1e-4:1e-2", "--set", "training.lr=0.1"], "both swept"),
    (["--param", "training.lr=log:1e-4:1e-2", "--nproc", "999"], "at most"),
])
def test_bad_sweeps_get_one_line(config: Path, tmp_path: Path, extra: list[str], says: str) -> None:
    proc = mtml("sweep", config, *extra, "--out", tmp_path / "bad")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr and proc.stderr.count("\n") <= 3, proc.stderr
    assert not (tmp_path / "bad" / "study.db").exists()


def test_help_answers() -> None:
    proc = mtml("sweep", "--help")
    assert proc.returncode == 0 and "--param" in proc.stdout and "--trials" in proc.stdout
