"""The classical baselines of benchmarks/multitask_vs_single.py (pooled model, mixed model) on simulated groups."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mtml.config import Config
from mtml.errors import ConfigError
from mtml.tasks import Split, Task, TaskKind


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multitask_vs_single.py"
    spec = importlib.util.spec_from_file_location("multitask_vs_single", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the class is made)
    spec.loader.exec_module(module)
    return module


bench = _load()
BETA = torch.tensor([0.5, -1.0, 2.0])  # intercept, then one coefficient per feature


def _groups(num: int = 12, rows: int = 60, *, slope_sd: float = 0.0, noise: float = 0.2,
            seed: int = 0) -> tuple[list[Task], torch.Tensor]:
    """Tasks ``g0…``: ``y = β₀ + b₀ + x·β + b₁·x₀ + ε`` with a random intercept ``b₀ ~ N(0, 1)`` (and slope ``b₁``) per
    group; returns the tasks and the true ``[num, 2]`` (b₀, b₁)."""
    gen = torch.Generator().manual_seed(seed)
    effects = torch.stack([torch.randn(num, generator=gen), slope_sd * torch.randn(num, generator=gen)], 1)
    tasks = []
    for i in range(num):
        def draw(n: int, i: int = i) -> Split:
            x = torch.randn(n, 2, generator=gen)
            y = BETA[0] + effects[i, 0] + x @ BETA[1:] + effects[i, 1] * x[:, 0] + noise * torch.randn(n, generator=gen)
            return Split(x, y)

        tasks.append(Task(f"g{i}", TaskKind.REGRESSION, draw(rows), draw(rows // 3), draw(rows // 3)))
    return tasks, effects


def test_mixed_model_recovers_random_intercepts() -> None:
    pytest.importorskip("statsmodels")
    tasks, effects = _groups()
    fitted = bench.fit_mixed_model(tasks)
    assert fitted.converged
    assert torch.allclose(torch.from_numpy(fitted.fixed[1:]).float(), BETA[1:], atol=0.03)
    for i, t in enumerate(tasks):  # a group's intercept: fixed plus its predicted random effect
        assert fitted.random[t.name].shape == (1,)
        assert fitted.fixed[0] + fitted.random[t.name][0] == pytest.approx(float(BETA[0] + effects[i, 0]), abs=0.1)
    scores = fitted.scores(tasks)
    assert set(scores) == {t.name for t in tasks}
    mean_mse = sum(s["mse"] for s in scores.values()) / len(scores)
    assert mean_mse == pytest.approx(0.2**2, rel=0.35)  # test error is the noise alone


def test_mixed_model_recovers_random_slopes_and_checks_its_inputs() -> None:
    pytest.importorskip("statsmodels")
    tasks, effects = _groups(slope_sd=0.7, seed=1)
    fitted = bench.fit_mixed_model(tasks, slope=0)
    for i, t in enumerate(tasks):
        b = fitted.random[t.name]
        assert fitted.fixed[1] + b[1] == pytest.approx(float(BETA[1] + effects[i, 1]), abs=0.12)
    with pytest.raises(ConfigError, match="--re-slope 2: the tasks have 2 features"):
        bench.fit_mixed_model(tasks, slope=2)
    x = torch.randn(6, 2)
    cls = Task("c", TaskKind.BINARY, Split(x, (x[:, 0] > 0).float()), Split(x, (x[:, 0] > 0).float()),
               Split(x, (x[:, 0] > 0).float()))
    with pytest.raises(ConfigError, match="1-output regression"):
        bench.fit_mixed_model([cls])


def test_pooled_model_scores_every_task_on_its_own_rows() -> None:
    tasks, effects = _groups(num=5, rows=30)
    pooled = bench.pooled_task(tasks)
    assert len(pooled.train) == sum(len(t.train) for t in tasks)
    assert torch.equal(pooled.test.x[: len(tasks[0].test)], tasks[0].test.x)
    cfg = Config.from_dict({"model": {"trunk_hidden": [8]}, "training": {"max_steps": 150, "eval_every": 25,
                                                                         "lr": 0.01, "batch_size": 32}})
    scores = bench.train_pooled(cfg, tasks)
    assert list(scores) == [t.name for t in tasks]
    assert all(math.isfinite(s["mse"]) and "r2" in s for s in scores.values())
    # one model for all groups misses each group's own intercept: its error is that group's offset² + noise²
    offsets = effects[:, 0] - effects[:, 0].mean()
    expected = (offsets**2 + 0.2**2).tolist()
    for (name, s), want in zip(scores.items(), expected, strict=True):
        assert s["mse"] == pytest.approx(want, abs=1.0), name
    assert sum(s["mse"] for s in scores.values()) / len(scores) == pytest.approx(sum(expected) / 5, rel=0.3)
    shared = [Task(t.name, t.kind, t.train, t.val, t.test, group="rows") for t in tasks[:1]]
    with pytest.raises(ConfigError, match="share rows"):
        bench.pooled_task(shared)


def test_paired_difference() -> None:
    mean, half, won, lost = bench.paired_difference({"a": 1.0, "b": 3.0, "c": 2.0}, {"a": 2.0, "b": 2.0, "c": 2.0})
    assert (mean, won, lost) == (0.0, 1, 1)
    assert half == pytest.approx(1.96 * 1.0 / math.sqrt(3))
