"""The fit loop: early stopping, best-state restore, divergence, logging, and exact resume."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from mtml.datasets import synthetic_linear
from mtml.engine import Run, StopRule, fit, load_checkpoint, train_multitask
from mtml.errors import CheckpointError, ConfigError, MtmlError
from mtml.nn import build_multitask_model


class Scripted:
    """A model whose only parameter records the step; validation returns a scripted objective sequence."""

    def __init__(self, objectives: Sequence[float]) -> None:
        self.module = nn.Linear(1, 1, bias=False)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.objectives = list(objectives)
        self.calls = 0
        self.steps = 0
        self.modes: list[bool] = []

    def train_step(self) -> dict[str, float]:
        self.steps += 1
        self.modes.append(self.module.training)
        with torch.no_grad():
            self.module.weight.fill_(self.steps)
        return {"loss": 1.0 / self.steps}

    def validate(self) -> dict[str, float]:
        assert not self.module.training and not torch.is_grad_enabled()
        value = self.objectives[self.calls]
        self.calls += 1
        return {"objective": value, "extra": value * 2}

    def run(self, stop: StopRule, **kw: object):  # type: ignore[no-untyped-def]
        return fit(modules={"m": self.module}, optimizer=self.opt, train_step=self.train_step,
                   validate=self.validate, stop=stop, **kw)


def _expected(objectives: Sequence[float], patience: int, min_delta: float) -> tuple[int, int, bool]:
    """(validations run, index of the best, stopped by patience) by StopRule's docstring, written out plainly."""
    best, best_i, bad = math.inf, -1, 0
    for i, v in enumerate(objectives):
        if v < best - min_delta:
            best, best_i, bad = v, i, 0
        else:
            bad += 1
            if patience and bad >= patience:
                return i + 1, best_i, True
    return len(objectives), best_i, False


@pytest.mark.parametrize(("objectives", "patience", "min_delta"), [
    ([5, 4, 3, 3.5, 3.2, 3.1, 1, 0.5], 3, 0.0),
    ([5, 4, 3, 3.5, 3.2, 2.95, 2.9, 2.85, 0.1], 3, 0.1),
    ([5, 4, 3, 3.5, 3.2, 2.95, 2.9, 2.85, 0.1], 3, 0.0),
    ([1, 2, 3, 4, 5, 6], 2, 0.0),
    ([3, 2, 1, 2, 3, 4, 5, 0], 0, 0.0),
    ([2, 2, 2, 2, 2], 4, 0.0),
])
def test_early_stopping_and_best_restore(objectives: list[float], patience: int, min_delta: float) -> None:
    every = 5
    s = Scripted(objectives)
    result = s.run(StopRule(max_steps=every * len(objectives), eval_every=every, patience=patience,
                            min_delta=min_delta))
    n_val, best_i, stopped = _expected(objectives, patience, min_delta)
    assert s.calls == n_val
    assert result.steps == every * n_val
    assert result.stopped_early == stopped
    assert result.best_step == every * (best_i + 1)
    assert result.best_objective == objectives[best_i]
    assert float(s.module.weight.detach()) == result.best_step  # the best validated state is restored
    assert [h["objective"] for h in result.history] == objectives[:n_val]
    assert all(s.modes)  # train_step runs in training mode even after a validation


def test_validation_at_max_steps_even_off_schedule() -> None:
    s = Scripted([3.0, 2.0, 1.0])
    result = s.run(StopRule(max_steps=23, eval_every=10, patience=5))
    assert s.calls == 3 and result.steps == 23 and result.best_step == 23


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_objective_raises(bad: float) -> None:
    s = Scripted([1.0, bad, 0.5])
    with pytest.raises(FloatingPointError, match="step 4") as info:
        s.run(StopRule(max_steps=20, eval_every=2))
    assert isinstance(info.value, MtmlError)  # the CLI reports it as a message, not a traceback


def test_stop_rule_validation() -> None:
    for kwargs, name in (({"max_steps": 0}, "max_steps"), ({"eval_every": 0}, "eval_every"),
                         ({"patience": -1}, "patience"), ({"min_delta": -0.1}, "min_delta"),
                         ({"min_delta": float("nan")}, "min_delta")):
        with pytest.raises(ConfigError, match=name):
            StopRule(**kwargs)  # type: ignore[arg-type]


def test_run_logging_checkpoints_and_best(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", {})
    s = Scripted([5, 3, 4, 2, 6, 7])
    result = s.run(StopRule(max_steps=30, eval_every=5, patience=0), run=run, log_every=4, keep_checkpoints=2)
    records = list(run.records())
    kinds = [r["kind"] for r in records]
    assert kinds.count("val") == 6 and kinds[-1] == "done"
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 4, 8, 12, 16, 20, 24, 28]
    assert [r["extra"] for r in records if r["kind"] == "val"] == [10, 6, 8, 4, 12, 14]
    assert records[-1]["best_step"] == 20 == result.best_step
    assert [s_ for s_, _ in run.checkpoints()] == [25, 30]
    best = load_checkpoint(run.best_checkpoint)
    assert best.meta["step"] == 20 and float(best.tensors["m.weight"]) == 20.0


def test_resume_needs_a_run_with_a_checkpoint(tmp_path: Path) -> None:
    s = Scripted([1.0])
    with pytest.raises(ConfigError, match="needs a run directory"):
        s.run(StopRule(max_steps=1, eval_every=1), resume=True)
    run = Run.create(tmp_path / "r", {})
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        s.run(StopRule(max_steps=1, eval_every=1), run=run, resume=True)


# -- exact resume of real training ----------------------------------------------------------------------------
def _train(tmp: Path, max_steps: int, *, weighting: str, resume: bool = False) -> tuple[dict, object]:
    tasks = synthetic_linear(num_tasks=4, in_dim=12, latent_dim=3, n_train=24, n_val=20, n_test=20, seed=3)
    torch.manual_seed(11 if resume else 7)  # a resumed model must not depend on its fresh initialisation
    model = build_multitask_model(tasks, trunk_hidden=(8,), activation="tanh")
    run = Run.open(tmp) if resume else Run.create(tmp, {})
    opts = {"period": 4} if weighting == "dwa" else {}
    result = train_multitask(model, tasks, weighting=weighting, weighting_options=opts, lr=3e-2, batch_size=8,
                             stop=StopRule(max_steps=max_steps, eval_every=10, patience=3), seed=5, run=run,
                             resume=resume)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path, weighting: str) -> None:
    full_state, full = _train(tmp_path / "full", 60, weighting=weighting)
    _train(tmp_path / "cut", 30, weighting=weighting)  # "interrupted" after the step-30 checkpoint
    resumed_state, resumed = _train(tmp_path / "cut", 60, weighting=weighting, resume=True)
    assert full.fit.steps > 30 and full.fit.best_step > 30  # the resumed part matters
    assert resumed.fit.steps == full.fit.steps and resumed.fit.best_step == full.fit.best_step
    assert resumed.fit.best_objective == full.fit.best_objective
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    assert resumed.test == full.test
    records = list(Run.open(tmp_path / "cut").records())
    assert any(r["kind"] == "resume" and r["step"] == 30 for r in records)
    # the weighting's state travelled too: compare the last logged train weights
    last = {r["step"]: r["weights"] for r in records if r["kind"] == "train"}
    full_last = {r["step"]: r["weights"] for r in Run.open(tmp_path / "full").records() if r["kind"] == "train"}
    assert last[max(full_last)] == full_last[max(full_last)]


def test_steps_run_in_train_mode_and_validation_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.Linear(3, 1)).eval()  # starts in eval mode
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modes: list[tuple[str, bool, bool]] = []

    def step() -> dict[str, float]:
        modes.append(("step", model.training, model[1].training))
        return {"loss": 1.0}

    def validate() -> dict[str, float]:
        modes.append(("val", model.training, model[1].training))
        return {"objective": 1.0}

    fit(modules={"model": model}, optimizer=opt, train_step=step, validate=validate,
        stop=StopRule(max_steps=6, eval_every=2, patience=0))
    assert modes == [(kind, kind == "step", kind == "step") for kind in ["step", "step", "val"] * 3]
