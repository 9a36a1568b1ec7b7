"""A diverged run never writes (or resumes from) a checkpoint holding NaN or inf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from mtml.config import Config
from mtml.engine import load_checkpoint, save_checkpoint
from mtml.errors import CheckpointError, DivergedError
from mtml.workflows import train


def test_a_module_with_nan_is_not_written(tmp_path: Path) -> None:
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(DivergedError, match=r"not writing checkpoint c\.safetensors: model\.bias holds NaN or inf"):
        save_checkpoint(tmp_path / "c.safetensors", modules={"model": net})
    assert not list(tmp_path.iterdir())  # nothing, not even a temporary file


def test_a_checkpoint_with_inf_written_elsewhere_is_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    path.write_bytes(st_save({"model.weight": torch.tensor([1.0, float("inf")])},
                             metadata={"mtml": json.dumps({"format": "mtml-checkpoint-1", "modules": ["model"]})}))
    with pytest.raises(CheckpointError, match=r"holds NaN or inf in model\.weight.*delete it to fall back"):
        load_checkpoint(path)


def test_a_diverging_run_keeps_only_finite_checkpoints_and_says_diverged(tmp_path: Path) -> None:
    config = Config.from_dict({
        "data": {"dataset": "synthetic"}, "model": {"trunk_hidden": [8]},
        "training": {"optimizer": "sgd", "lr": 1e6, "max_steps": 40, "eval_every": 50, "checkpoint_every": 1},
    })
    with pytest.raises(DivergedError, match="holds NaN or inf"):
        train(config, tmp_path / "run")
    written = sorted((tmp_path / "run" / "checkpoints").glob("step-*.safetensors"))
    assert written  # the steps before the divergence
    for path in written:
        load_checkpoint(path)  # every one of them finite
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "diverged"
