"""A grouped table (one regression per hospital) end to end on the command line: train on most hospitals, then
evaluate, transfer to and rank for the held-out ones, each command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
GROUPS, ROWS = 30, 20
HELD = [f"H{g:02d}" for g in (4, 9, 14, 19, 24, 29)]  # heldout_groups 0.2: every fifth hospital in sorted order


def mtml(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _csv(path: Path) -> Path:
    """y = hospital intercept + hospital slope · x + noise; w is noise, row a row id."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(GROUPS):
        intercept, slope = rng.normal(), 1 + 0.3 * rng.normal()
        for _ in range(ROWS):
            x = rng.normal()
            rows.append({"row": len(rows), "hospital": f"H{g:02d}", "x": x, "w": rng.normal(),
                         "y": intercept + slope * x + 0.1 * rng.normal()})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _configs(root: Path, **extra: Any) -> tuple[Path, Path]:
    options = {"path": str(_csv(root / "hospitals.csv")), "targets": {"y": {"column": "y", "kind": "regression"}},
               "group_by": "hospital", "ids": ["row"], "heldout_groups": 0.2, **extra}
    source = {"name": "grouped-source", "seed": 0, "threads": 1,
              "data": {"dataset": "table", "options": {**options, "subset": "train"}},
              "model": {"trunk_hidden": [8]},
              "training": {"lr": 0.01, "batch_size": 16, "max_steps": 60, "eval_every": 20, "patience": 0}}
    target = {"name": "grouped-target", "seed": 0, "data": {"dataset": "table",
                                                            "options": {**options, "subset": "heldout"}}}
    (root / "source.yaml").write_text(yaml.safe_dump(source, sort_keys=False))
    (root / "target.yaml").write_text(yaml.safe_dump(target, sort_keys=False))
    return root / "source.yaml", root / "target.yaml"


@pytest.mark.slow  # four subprocesses, each importing torch
def test_train_eval_transfer_and_rank_on_held_out_groups(tmp_path: Path) -> None:
    source, target = _configs(tmp_path)
    run, out = tmp_path / "run", tmp_path / "transfer"

    proc = mtml("train", source, "--out", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and len(summary["tasks"]) == GROUPS - len(HELD)
    assert not {f"y_{h}" for h in HELD} & set(summary["tasks"])

    proc = mtml("eval", run)
    assert proc.returncode == 0, proc.stderr
    assert "y_H00" in proc.stdout and "mse" in proc.stdout

    proc = mtml("transfer", run, "--target", target, "--sizes", "2,all", "--repeats", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "transfer.json").read_text())
    assert result["sizes"] == [2, "all"] and "scratch" in result["strategies"]
    assert (out / "transfer.md").is_file() and (out / "plots" / "transfer.png").is_file()

    proc = mtml("rank", "--target", target, run, "--out", tmp_path / "rank.json")
    assert proc.returncode == 0, proc.stderr
    ranking = json.loads((tmp_path / "rank.json").read_text())
    assert sorted(ranking) == [f"y_{h}" for h in HELD]


def test_missing_group_column_fails_with_one_line(tmp_path: Path) -> None:
    source, _ = _configs(tmp_path, group_by="ward")
    proc = mtml("train", source, "--out", tmp_path / "run", "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "group_by: column 'ward' is not in the table" in err and "hospital" in err
    assert not (tmp_path / "run").exists()
