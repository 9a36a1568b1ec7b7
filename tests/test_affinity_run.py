"""End-to-end: `task_affinity` / `mtml affinity` and `rank_sources` / `mtml rank` into temporary directories."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtml.config import Config
from mtml.errors import ConfigError, ShapeError
from mtml.workflows import rank_sources, task_affinity, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
SMALL = {
    "name": "aff-test", "seed": 0, "threads": 1,
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 8, "latent_dim": 2, "n_train": 20,
                                                 "n_val": 20, "n_test": 20}},
    "model": {"trunk_hidden": [6]},
    "training": {"weighting": "equal", "lr": 0.01, "batch_size": 10, "max_steps": 30, "eval_every": 10,
                 "patience": 0},
}


def mtml(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=180)


def test_task_affinity_writes_matrix_groups_and_heatmap(tmp_path: Path) -> None:
    res = task_affinity(Config.from_dict(SMALL), tmp_path / "run", every=5)
    assert res.steps_recorded == 6 and sorted(res.groupings) == [1, 2, 3]
    data = json.loads((tmp_path / "run" / "affinity.json").read_text())
    assert data["tasks"] == ["task_0", "task_1", "task_2"]
    assert len(data["matrix"]) == 3 and all(len(r) == 3 and all(math.isfinite(v) for v in r) for r in data["matrix"])
    assert data["suggested_groups"] in (1, 2, 3)
    best = data["groupings"][str(data["suggested_groups"])]["score"]
    assert all(g["score"] <= best + 1e-12 for g in data["groupings"].values())
    assert sorted(t for g in data["groupings"]["2"]["groups"] for t in g) == data["tasks"]
    png = tmp_path / "run" / "plots" / "affinity.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["affinity"]["steps_recorded"] == 6 and "test" in summary
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


def test_task_affinity_errors(tmp_path: Path) -> None:
    meta = {"name": "m", "data": {"dataset": "sinusoid"}, "training": {"algorithm": "maml"}}
    with pytest.raises(ConfigError, match="meta-learning"):
        task_affinity(Config.from_dict(meta), tmp_path / "a")
    with pytest.raises(ConfigError, match="--groups"):
        task_affinity(Config.from_dict(SMALL), tmp_path / "b", groups=4)
    with pytest.raises(ConfigError, match="--every"):
        task_affinity(Config.from_dict(SMALL), tmp_path / "c", every=0)
    assert not (tmp_path / "b").exists()  # bad settings fail before the run directory is made


@pytest.mark.slow  # subprocess start-up dominates: ~30 s on a busy 2-core machine
def test_cli_affinity(tmp_path: Path) -> None:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    proc = mtml("affinity", cfg, "--out", tmp_path / "run", "--every", "5", "--groups", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "suggested" in proc.stdout and "task_0" in proc.stdout
    assert (tmp_path / "run" / "plots" / "affinity.png").exists()
    bad = mtml("affinity", cfg, "--out", tmp_path / "run2", "--groups", "9", "--quiet")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--groups" in bad.stderr


def _table_config(csv: Path, name: str, targets: dict[str, str], steps: int = 60) -> dict:
    kinds = {"score": "regression"}
    return {"name": name, "seed": 0, "threads": 1,
            "data": {"dataset": "table", "options": {
                "path": str(csv), "features": [f"f{i}" for i in range(6)],
                "targets": {k: {"column": v, "kind": kinds.get(v, "multiclass")} for k, v in targets.items()}}},
            "model": {"trunk_hidden": [16]},
            "training": {"lr": 0.01, "batch_size": 32, "max_steps": steps, "eval_every": 20, "patience": 0}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    pd = pytest.importorskip("pandas")
    root = tmp_path_factory.mktemp("rank")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    frame = {f"f{i}": x[:, i].numpy() for i in range(6)}
    frame["a"] = (x[:, :3].argmax(1)).numpy().astype(str)
    frame["b"] = ((x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()).numpy().astype(str)
    frame["noise"] = torch.randint(0, 3, (300,), generator=g).numpy().astype(str)
    frame["score"] = (x[:, 0] - 2 * x[:, 3]).numpy()
    csv = root / "data.csv"
    pd.DataFrame(frame).to_csv(csv, index=False)
    runs = []
    for name, targets in (("related", {"a": "a"}), ("unrelated", {"noise": "noise"})):
        run, _ = train(Config.from_dict(_table_config(csv, name, targets)), root / name)
        runs.append(run.path)
    target = root / "target.yaml"
    target.write_text(yaml.safe_dump(_table_config(csv, "target", {"b": "b", "score": "score"})))
    return target, runs


def test_rank_sources_scores_every_estimator(sources: tuple[Path, list[Path]]) -> None:
    target, runs = sources
    ranking = rank_sources(Config.from_dict(yaml.safe_load(target.read_text())), runs)
    rows = ranking["b"]
    assert {r["run"] for r in rows} == {str(p) for p in runs}
    for r in rows:
        assert set(r["scores"]) == {"logme", "leep", "nce", "hscore", "transrate"}
        assert all(v is not None and math.isfinite(v) for v in r["scores"].values())
        assert r["scores"]["leep"] <= 0 and r["scores"]["nce"] <= 0
    assert rows[0]["scores"]["logme"] >= rows[1]["scores"]["logme"]
    for r in ranking["score"]:  # a regression target: only LogME is defined
        assert math.isfinite(r["scores"]["logme"])
        assert r["scores"]["leep"] is None and r["scores"]["nce"] is None and r["scores"]["hscore"] is None
        assert r["scores"]["transrate"] is None
    only = rank_sources(Config.from_dict(yaml.safe_load(target.read_text())), runs[:1], task="score")
    assert list(only) == ["score"] and only["score"][0]["source_task"] == "a"


@pytest.mark.slow  # subprocess start-up dominates: ~30 s on a busy 2-core machine
def test_cli_rank_and_errors(sources: tuple[Path, list[Path]], tmp_path: Path) -> None:
    target, runs = sources
    proc = mtml("rank", *runs, "--target", target, "--by", "hscore", "--out", tmp_path / "rank.json")
    assert proc.returncode == 0, proc.stderr
    assert "sources ranked by hscore" in proc.stdout
    data = json.loads((tmp_path / "rank.json").read_text())
    scores = [r["scores"]["hscore"] for r in data["b"]]
    assert scores == sorted(scores, reverse=True)
    bad = mtml("rank", *runs, "--target", target, "--by", "logm")
    assert bad.returncode == 2 and "Did you mean 'logme'" in bad.stderr
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(SMALL))
    with pytest.raises(ShapeError, match="same input features"):
        rank_sources(Config.from_dict(SMALL), runs)


def test_rank_accepts_a_meta_learning_source(sources: tuple[Path, list[Path]], tmp_path: Path) -> None:
    target, runs = sources
    meta = {"name": "proto", "seed": 0, "threads": 1,
            "data": {"dataset": "gaussian_classes", "options": {"dim": 6, "classes": 30, "ways": 3, "meta_batch": 2}},
            "model": {"trunk_hidden": [8]},
            "training": {"algorithm": "protonet", "max_steps": 10, "eval_every": 5, "patience": 0,
                         "meta_val_tasks": 4, "meta_test_tasks": 4}}
    run, _ = train(Config.from_dict(meta), tmp_path / "proto")
    ranking = rank_sources(Config.from_dict(yaml.safe_load(target.read_text())), [run.path, runs[0]], task="b")
    row = next(r for r in ranking["b"] if r["run"] == str(run.path))
    assert row["source_task"] == "task" and math.isfinite(row["scores"]["logme"])
