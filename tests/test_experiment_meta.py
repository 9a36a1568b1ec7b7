"""Every meta-learning algorithm runs from a config (library and CLI), resumes, and evaluates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtml.config import Config
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS
from mtml.workflows import evaluate_run, resume_run, train


def _config(algorithm: str, family: str, **training: object) -> Config:
    data = {"sinusoid": {"shots": 3, "query_shots": 4, "meta_batch": 4},
            "gaussian_classes": {"classes": 45, "dim": 6, "ways": 3, "shots": 1, "query_shots": 2, "meta_batch": 2}}
    return Config.from_dict({
        "name": f"{algorithm}-{family}", "threads": 1,
        "data": {"dataset": family, "options": data[family]},
        "model": {"trunk_hidden": [8, 8]},
        "training": {"algorithm": algorithm, "max_steps": 4, "eval_every": 2, "meta_val_tasks": 6,
                     "meta_test_tasks": 6, **training},
    })


#: algorithms whose head is a classifier built from the support set (prototypes, an SVM, a fitted softmax head)
CLASSIFICATION_ONLY = {"protonet", "proto_maml", "metaoptnet", "baseline", "baseline_pp", "rfs_linear"}
CASES = [(a, "gaussian_classes") for a in ALGORITHMS.names()] + [
    (a, "sinusoid") for a in ALGORITHMS.names() if a not in CLASSIFICATION_ONLY
]


@pytest.mark.parametrize(("algorithm", "family"), CASES)
def test_every_algorithm_trains_from_config(tmp_path: Path, algorithm: str, family: str) -> None:
    run, result = train(_config(algorithm, family), tmp_path / "run")
    summary = json.loads((run.path / "summary.json").read_text())
    scores = summary["test"][family]
    assert summary["algorithm"] == algorithm and scores["num_tasks"] == 6
    assert all(k.startswith(("loss@", "accuracy@")) or k == "num_tasks" for k in scores)
    assert result.fit.steps == 4 and (run.path / "checkpoints" / "best.safetensors").is_file()


def test_meta_run_resumes_and_evaluates(tmp_path: Path) -> None:
    cfg = _config("maml", "sinusoid")
    run, _ = train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    _, again = resume_run(run.path)
    assert again.fit.steps == 4
    scores = evaluate_run(run.path, num_tasks=5, shots=2, steps=3)["sinusoid"]
    assert scores["num_tasks"] == 5 and {"loss@0", "loss@1", "loss@3"} <= set(scores)


def test_family_and_algorithm_mismatch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="task family, which needs a meta-learning algorithm"):
        Config.from_dict({"data": {"dataset": "sinusoid"}})
    with pytest.raises(ConfigError, match=r"training\.algorithm: unknown algorithm .mamll.\. Did you mean .maml."):
        Config.from_dict({"data": {"dataset": "sinusoid"}, "training": {"algorithm": "mamll"}})
    with pytest.raises(ConfigError, match=r"training\.algorithm_options: unknown option .inner_rate."):
        Config.from_dict({"data": {"dataset": "sinusoid"}, "training": {"algorithm": "maml",
                                                                          "algorithm_options": {"inner_rate": 1}}})


def test_cli_meta_train_and_eval(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {dataset: sinusoid, options: {shots: 3, meta_batch: 4}}\nmodel: {trunk_hidden: [8]}\n"
                   "training: {algorithm: fomaml, max_steps: 4, eval_every: 2, meta_val_tasks: 5, "
                   "meta_test_tasks: 5}\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mtml"]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([*cmd, "train", str(cfg), "--out", str(out), "--quiet"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "meta-test over 5 held-out tasks" in done.stdout
    done = subprocess.run([*cmd, "eval", str(out), "--tasks", "7", "--steps", "2"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "meta-test over 7 held-out tasks" in done.stdout
    bad = subprocess.run([*cmd, "eval", str(out), "--tasks", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--tasks must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
