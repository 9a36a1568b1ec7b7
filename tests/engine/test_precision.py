"""Mixed precision: ``training.precision: bf16`` runs steps and evaluations under bfloat16 autocast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mtml.engine._trainer as trainer
import mtml.workflows._meta as meta_workflow
from mtml.config import Config
from mtml.engine import autocast, check_precision
from mtml.errors import ConfigError
from mtml.meta import ALGORITHMS, Episode
from mtml.nn import MultiTaskModel, build_backbone, feature_dim
from mtml.tasks import Split
from mtml.workflows import train


@pytest.mark.parametrize(("precision", "device", "match"), [
    ("fp16", "cpu", r"fp16 needs a gradient scaler.*use bf16"),
    ("fp8", "cpu", r"must be one of fp32, bf16, fp16\. Got 'fp8'"),
    ("bf16", "meta", r"bf16 autocast runs on cpu and cuda, not meta"),
])
def test_unsupported_precisions_are_refused_with_the_fix(precision: str, device: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_precision(precision, device)


def test_fp32_is_no_autocast_and_bf16_is() -> None:
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def _conv_case() -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    trunk = build_backbone("conv4", (1, 28, 28), {"width": 64, "groups": 8})
    model = MultiTaskModel(trunk, {"task": nn.Linear(feature_dim(trunk), 3)})
    g = torch.Generator().manual_seed(1)
    episode = Episode(Split(torch.randn(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1)),
                      Split(torch.randn(2, 6, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 2)), ways=3)
    return model, episode


def _mlp_case() -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    g = torch.Generator().manual_seed(1)
    episode = Episode(*(Split(torch.randn(25, 5, 1, generator=g), torch.randn(25, 5, 1, generator=g))
                        for _ in range(2)))
    return model, episode


#: (cosine >, relative error <) of the bf16 meta-gradient against float32's; measured on these cases
#: (3 Dec 2026, MAML / FOMAML / Reptile): Conv-4 width 64, one inner step at lr 0.1: cosine 0.996 / 0.992 /
#: 0.997, relative error 0.09 / 0.13 / 0.08; MLP 1-40-40-1, two steps at lr 0.01: cosine 0.998 / 0.998 / 1.000,
#: relative error 0.06 / 0.06 / 0.006
TOLERANCE = {"conv": (0.98, 0.25), "mlp": (0.99, 0.1)}


@pytest.mark.parametrize("case", ["conv", "mlp"])
@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
def test_bf16_meta_gradient_is_close_to_fp32(case: str, name: str) -> None:
    """bfloat16 keeps 8 significant bits, and the inner loop compounds the rounding: the meta-gradient points
    the same way as float32's and stays within a stated relative error (:data:`TOLERANCE`)."""
    model, episode = _conv_case() if case == "conv" else _mlp_case()
    lr, steps = (0.1, 1) if case == "conv" else (0.01, 2)
    algorithm = ALGORITHMS.create(name, model, inner_lr=lr, inner_steps=steps)
    params = list(model.parameters())
    full = torch.cat([g.flatten() for g in torch.autograd.grad(algorithm.meta_objective(model, episode).objective,
                                                               params)])
    with autocast("bf16", "cpu"):
        objective = algorithm.meta_objective(model, episode).objective
    half = torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)])
    assert half.dtype == torch.float32  # parameters (and so their gradients) stay float32
    assert not torch.equal(half, full)  # bf16 really ran
    cosine, relative = TOLERANCE[case]
    assert float(torch.nn.functional.cosine_similarity(full, half, 0)) > cosine
    assert float((full - half).norm() / full.norm()) < relative


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[bool]:
    seen: list[bool] = []
    original = getattr(module, name)

    def spied(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_meta_run_steps_and_evaluates_under_the_configured_precision(
        tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _spy(monkeypatch, meta_workflow, "sharded_meta_step")
    scores = _spy(monkeypatch, meta_workflow, "meta_evaluate")
    config = Config.from_dict({
        "threads": 1, "data": {"dataset": "sinusoid", "options": {"shots": 3, "query_shots": 4, "meta_batch": 4}},
        "model": {"trunk_hidden": [8, 8]},
        "training": {"algorithm": "maml", "max_steps": 4, "eval_every": 2, "meta_val_tasks": 4,
                     "meta_test_tasks": 4, "precision": precision},
    })
    run, _ = train(config, tmp_path / "run")
    assert steps and scores and set(steps + scores) == {precision == "bf16"}
    test = next(iter(run.summary()["test"].values()))
    assert torch.isfinite(torch.tensor(test["loss@1"]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_joint_run_steps_and_evaluates_under_the_configured_precision(
        tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _spy(monkeypatch, trainer, "sharded_joint_step")
    scores = _spy(monkeypatch, trainer, "evaluate")
    config = Config.from_dict({
        "data": {"dataset": "synthetic", "options": {"num_tasks": 2, "in_dim": 4, "latent_dim": 2, "n_train": 8,
                                                     "n_val": 5, "n_test": 5}},
        "model": {"trunk_hidden": [4]},
        "training": {"max_steps": 4, "eval_every": 2, "precision": precision},
    })
    _, result = train(config, tmp_path / "run")
    assert steps and scores and set(steps + scores) == {precision == "bf16"}
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.test.values())
