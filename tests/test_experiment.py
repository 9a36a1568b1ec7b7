"""Experiment set-up: a failed start leaves nothing behind; config types are strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtml.config import Config
from mtml.errors import ConfigError
from mtml.workflows import train

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


@pytest.mark.parametrize("architecture", ["hps", "mmoe", "cgc", "ple", "cross_stitch", "mtan", "dselect_k"])
def test_every_architecture_and_a_gramian_weighting_train_from_config(tmp_path: Path, architecture: str) -> None:
    from mtml.nn import ARCHITECTURES

    assert architecture in ARCHITECTURES
    cfg = Config.from_dict({**SMALL, "model": {"trunk_hidden": [4], "architecture": architecture},
                            "training": {**SMALL["training"], "weighting": {"name": "pcgrad", "gramian": "loop"}}})
    run, result = train(cfg, tmp_path / "run")
    assert result.fit.steps == 5 and (run.path / "summary.json").is_file()


def test_architecture_and_gramian_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"model\.architecture: unknown architecture 'moe'"):
        Config.from_dict({**SMALL, "model": {"architecture": "moe"}})
    with pytest.raises(ConfigError, match="share_trunk: false is hard sharing"):
        Config.from_dict({**SMALL, "model": {"architecture": "mmoe", "share_trunk": False}})
    with pytest.raises(ConfigError, match="weighting 'equal' uses no per-task gradients"):
        Config.from_dict({**SMALL, "training": {"weighting": {"name": "equal", "gramian": "loop"}}})
    with pytest.raises(ConfigError, match=r"model\.options: unknown option 'experts'"):
        Config.from_dict({**SMALL, "model": {"architecture": "mmoe", "options": {"experts": 3}}})
