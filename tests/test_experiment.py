"""Experiment set-up: a failed start leaves nothing behind; config types are strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtml.config import Config
from mtml.errors import ConfigError
from mtml.experiment import train

SMALL = {
    "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 4, "latent_dim": 2, "n_train": 5,
                                                 "n_val": 5, "n_test": 5}},
    "model": {"trunk_hidden": [4]},
    "training": {"max_steps": 5, "eval_every": 5},
}


@pytest.mark.parametrize(("override", "needle"), [
    ({"training": {**SMALL["training"], "weighting": {"name": "dwa", "options": {"temperature": 0}}}},
     "temperature"),
    ({"training": {**SMALL["training"], "weighting": {"name": "fixed", "options": {"weights": {"nope": 1}}}}},
     "nope"),
    ({"device": "tpu"}, "tpu"),
])
def test_a_failed_start_leaves_no_run_directory(tmp_path: Path, override: dict, needle: str) -> None:
    """Otherwise re-running the fixed command fails with RunExistsError, and --resume finds no checkpoint."""
    cfg = Config.from_dict({**SMALL, **override})
    with pytest.raises(ConfigError, match=needle):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", [
    {"training": {"lr": True}},
    {"training": {"max_steps": True}},
    {"seed": False},
    {"model": {"trunk_hidden": [True]}},
])
def test_booleans_are_not_numbers(data: dict) -> None:
    """YAML reads `lr: yes` as True; pydantic's lax mode then silently trains with lr = 1.0."""
    with pytest.raises(ConfigError):
        Config.from_dict(data)
