"""Per-task early stopping (``stop_per_task``): each task restored from its own best validation, refused on
shared parameters, exact resume, and the config key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mtml.config import Config
from mtml.datasets import synthetic_linear
from mtml.engine import Run, StopRule, load_checkpoint
from mtml.engine._trainer import TrainResult, train_multitask
from mtml.errors import ConfigError
from mtml.nn import MultiTaskModel, build_multitask_model
from mtml.tasks import Split, Task, TaskKind
from mtml.workflows import train


def _tasks() -> list[Task]:
    """Three tasks that peak at different steps: few noisy training rows overfit early, many rows keep improving."""
    tasks = []
    gen = torch.Generator().manual_seed(4)
    for i, (n_train, noise) in enumerate([(40, 0.05), (3, 1.0), (10, 0.3)]):
        w = torch.randn(5, generator=gen)

        def draw(n: int, noise: float, w: torch.Tensor = w) -> Split:
            x = torch.randn(n, 5, generator=gen)
            return Split(x, x @ w + noise * torch.randn(n, generator=gen))

        tasks.append(Task(f"t{i}", TaskKind.REGRESSION, draw(n_train, noise), draw(30, 0.05), draw(30, 0.05)))
    return tasks


class Snapshots:
    """A progress hook keeping each task's parameters after every validation step."""

    def __init__(self, model: MultiTaskModel, every: int) -> None:
        self.model, self.every = model, every
        self.at: dict[int, dict[str, list[torch.Tensor]]] = {}

    def start(self, total: int, completed: int) -> None: ...
    def stop(self) -> None: ...

    def update(self, step: int, info: Mapping[str, Any]) -> None:
        if "val" in info and step % self.every == 0:
            self.at[step] = {n: [p.detach().clone() for p in self.model.task_parameters(n)]
                             for n in self.model.task_names}


@pytest.mark.parametrize("min_delta", [0.0, 0.01])
def test_every_task_is_restored_from_its_own_best_validation(min_delta: float) -> None:
    tasks = _tasks()
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=(8,), share_trunk=False)
    hook = Snapshots(model, every=10)
    patience = 4
    result = train_multitask(model, tasks, lr=3e-2, batch_size=16, seed=1, progress=hook, stop_per_task=True,
                             stop=StopRule(max_steps=1000, eval_every=10, patience=patience, min_delta=min_delta))
    vals = [r for r in result.fit.history if r["kind"] == "val"]
    expected: dict[str, int] = {}
    for t in tasks:  # the rule written out plainly: strictly better than the best so far by more than min_delta,
        best, at, bad = float("inf"), 0, 0  # until the task has gone `patience` validations without that (it stops)
        for r in vals:
            if bad >= patience:
                break
            if r["tasks"][t.name]["loss"] < best - min_delta:
                best, at, bad = r["tasks"][t.name]["loss"], r["step"], 0
            else:
                bad += 1
        expected[t.name] = at
    assert result.best_steps == expected
    assert len(set(expected.values())) == len(tasks)  # the tasks' best steps really differ
    for name, step in expected.items():
        for restored, kept in zip(model.task_parameters(name), hook.at[step][name], strict=True):
            assert torch.equal(restored.detach(), kept), (name, step)
        best_loss = next(r["tasks"][name]["loss"] for r in vals if r["step"] == step)
        assert result.val[name]["loss"] == best_loss
    # it stopped once every task had stopped (`patience` validations without improving), not before
    assert result.fit.stopped_early
    assert result.fit.steps == max(expected.values()) + patience * 10
    assert result.fit.best_step == max(expected.values())
    assert result.fit.best_objective == pytest.approx(sum(result.val[n]["loss"] for n in expected) / len(tasks))


def test_patience_zero_trains_to_max_steps_and_still_restores_per_task() -> None:
    tasks = _tasks()
    torch.manual_seed(0)
    model = build_multitask_model(tasks, trunk_hidden=(8,), share_trunk=False)
    result = train_multitask(model, tasks, lr=3e-2, batch_size=16, stop_per_task=True,
                             stop=StopRule(max_steps=60, eval_every=10, patience=0))
    assert result.fit.steps == 60 and not result.fit.stopped_early
    vals = [r for r in result.fit.history if r["kind"] == "val"]
    for name in result.best_steps:
        assert result.val[name]["loss"] == min(r["tasks"][name]["loss"] for r in vals)


def test_refused_when_tasks_share_trained_parameters() -> None:
    tasks = _tasks()
    shared = build_multitask_model(tasks, trunk_hidden=(8,))
    with pytest.raises(ConfigError, match=r"stop_per_task: .*share [\d,]+ trained parameters.*share_trunk: false"):
        train_multitask(shared, tasks, stop=StopRule(max_steps=5, eval_every=5), stop_per_task=True)
    for p in shared.shared_parameters():  # a frozen trunk is shared but never trained: fine
        p.requires_grad_(False)
    train_multitask(shared, tasks, stop=StopRule(max_steps=5, eval_every=5), stop_per_task=True)
    one_stem = MultiTaskModel(nn.Identity(), {t.name: nn.Linear(3, 1) for t in tasks}, {"s": nn.Linear(5, 3)},
                              stem_of={t.name: "s" for t in tasks})
    with pytest.raises(ConfigError, match="stop_per_task"):
        train_multitask(one_stem, tasks, stop=StopRule(max_steps=5, eval_every=5), stop_per_task=True)


def _train(tmp: Path, max_steps: int, *, resume: bool = False) -> tuple[dict[str, torch.Tensor], TrainResult]:
    tasks = synthetic_linear(num_tasks=4, in_dim=6, latent_dim=2, n_train=6, n_val=12, n_test=12, seed=3)
    torch.manual_seed(11 if resume else 7)  # a resumed model must not depend on its fresh initialisation
    model = build_multitask_model(tasks, trunk_hidden=(6,), activation="tanh", share_trunk=False)
    run = Run.open(tmp) if resume else Run.create(tmp, {})
    result = train_multitask(model, tasks, weighting="uncertainty", lr=3e-2, batch_size=4, seed=5, run=run,
                             resume=resume, stop_per_task=True,
                             stop=StopRule(max_steps=max_steps, eval_every=10, patience=3))
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    full_state, full = _train(tmp_path / "full", 200)
    _train(tmp_path / "cut", 30)  # "interrupted" after the step-30 checkpoint
    resumed_state, resumed = _train(tmp_path / "cut", 200, resume=True)
    assert full.fit.steps > 30 and max(full.best_steps.values()) > 30  # the resumed part matters
    assert min(full.best_steps.values()) < max(full.best_steps.values())
    assert resumed.best_steps == full.best_steps
    assert (resumed.fit.steps, resumed.fit.best_step, resumed.fit.best_objective) == \
        (full.fit.steps, full.fit.best_step, full.fit.best_objective)
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    assert resumed.val == full.val and resumed.test == full.test
    # the best checkpoint (what `mtml eval` reads) holds the per-task restored model
    best = load_checkpoint(Run.open(tmp_path / "cut").best_checkpoint).module_state("model")
    assert best.keys() == full_state.keys()
    assert all(torch.equal(best[k], full_state[k]) for k in best)


SMALL: dict[str, Any] = {
    "data": {"dataset": "synthetic", "options": {"num_tasks": 3, "in_dim": 4, "latent_dim": 2, "n_train": 5,
                                                 "n_val": 5, "n_test": 5}},
    "model": {"trunk_hidden": [4], "share_trunk": False},
    "training": {"max_steps": 20, "eval_every": 5, "stop_per_task": True},
}


def test_config_key_round_trip_and_training_from_config(tmp_path: Path) -> None:
    assert Config.from_dict({}).training.stop_per_task is False
    cfg = Config.from_dict(SMALL)
    assert cfg.training.stop_per_task is True
    assert Config.from_dict(cfg.to_dict()) == cfg
    run, result = train(cfg, tmp_path / "run")
    assert set(result.best_steps) == {"task_0", "task_1", "task_2"}
    assert run.summary()["task_best_steps"] == result.best_steps
    shared = Config.from_dict({**SMALL, "model": {"trunk_hidden": [4]}})
    with pytest.raises(ConfigError, match="stop_per_task"):
        train(shared, tmp_path / "shared")
    with pytest.raises(ConfigError, match="stop_per_task applies to joint training only"):
        Config.from_dict({"data": {"dataset": "sinusoid"}, "training": {"algorithm": "maml", "stop_per_task": True}})


def test_a_stopped_task_keeps_its_best_even_if_it_would_improve_later() -> None:
    from mtml.engine._trainer import TaskBests

    tasks = _tasks()
    model = build_multitask_model(tasks, trunk_hidden=(8,), share_trunk=False)
    bests = TaskBests(model, [t.name for t in tasks], patience=2)
    names = [t.name for t in tasks]
    first = {n: 1.0 for n in names}
    assert bests.update(model, first) == len(names)
    worse = {n: 2.0 for n in names}
    bests.update(model, worse)
    bests.update(model, worse)  # every task has now gone 2 validations without improving: stopped
    assert all(bests.stopped())
    assert bests.update(model, {n: 0.1 for n in names}) == 0  # a later improvement no longer counts
    assert bests.loss.tolist() == [1.0] * len(names)
