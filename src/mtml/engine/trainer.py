"""``train_multitask``: the library entry point for joint multi-task training."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtml.engine.dist_steps import sharded_joint_step
from mtml.engine.fit import FitResult, ProgressHook, StopRule, fit
from mtml.engine.joint import Batch, TaskBatcher, evaluate, objective
from mtml.engine.run import Run
from mtml.errors import ConfigError, UnknownNameError
from mtml.groups import tasks_to
from mtml.nn.model import MultiTaskModel
from mtml.tasks import Task
from mtml.weighting import WEIGHTINGS, Weighting

__all__ = ["TrainResult", "make_optimizer", "train_multitask"]

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}


def make_optimizer(name: str, params: Any, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.9) over ``params``."""
    if name not in _OPTIMIZERS:
        raise UnknownNameError(f"unknown optimizer '{name}'; use one of {', '.join(_OPTIMIZERS)}.")
    if not lr > 0:
        raise ConfigError(f"`lr` must be > 0. Got {lr}.")
    if not weight_decay >= 0:
        raise ConfigError(f"`weight_decay` must be >= 0. Got {weight_decay}.")
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    # The fused kernel updates every tensor in one call: ~2x faster steps for models with many small heads.
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return _OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, fused=fused or None)  # type: ignore[call-arg]


@dataclass
class TrainResult:
    """Outcome of :func:`train_multitask`: the loop's record and per-task metrics of the restored best model."""

    fit: FitResult
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"best_step": self.fit.best_step, "steps": self.fit.steps, "best_objective": self.fit.best_objective,
                "stopped_early": self.fit.stopped_early, "seconds": round(self.fit.seconds, 3),
                "val": self.val, "test": self.test}


def train_multitask(
    model: MultiTaskModel,
    tasks: Sequence[Task],
    *,
    weighting: str | Weighting = "equal",
    weighting_options: Mapping[str, Any] | None = None,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    stop: StopRule | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    run: Run | None = None,
    resume: bool = False,
    progress: ProgressHook | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    before_step: Callable[[Batch], object] | None = None,
) -> TrainResult:
    """Train ``model`` on every task jointly, minimising ``Σᵢ wᵢ·Lᵢ``; stop early on the mean validation loss.

    Every task needs a ``val`` split (it drives early stopping and best-checkpoint selection); ``test``
    metrics are computed at the end when the tasks have a test split. Results are reproducible from ``seed``.
    ``before_step`` (optional) is called with each step's batch ``{task: (x, y)}`` before the update, e.g. a
    :class:`mtml.transfer.TagRecorder`; it must not change the model.
    """
    stop = stop or StopRule()
    _check_tasks(model, tasks)
    tasks = tasks_to(tasks, device)  # tensors shared by a task group stay shared
    model.to(device)
    names = [t.name for t in tasks]
    if isinstance(weighting, str):
        weighting = WEIGHTINGS.create(weighting, names, where=f"weighting '{weighting}'",
                                      **dict(weighting_options or {}))
    weighting.to(device)
    params = list(model.parameters()) + list(weighting.parameters())
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    batcher = TaskBatcher(tasks, batch_size)
    by_name = {t.name: t for t in tasks}

    def step() -> dict[str, Any]:
        # in a process group every rank draws the same batch and trains on its share of each task's rows
        batch = batcher.sample(gen)
        if before_step is not None:
            before_step(batch)
        return sharded_joint_step(model, by_name, batch, weighting, opt).as_dict()

    def validate() -> dict[str, Any]:
        metrics = evaluate(model, tasks, "val")
        return {"objective": objective(metrics), "tasks": metrics}

    result = fit(modules={"model": model, "weighting": weighting}, optimizer=opt, train_step=step,
                 validate=validate, stop=stop, generators={"sampler": gen}, run=run, resume=resume,
                 checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, progress=progress)
    val = evaluate(model, tasks, "val")
    test = evaluate(model, [t for t in tasks if t.test is not None], "test")
    return TrainResult(result, val, test)


def _check_tasks(model: MultiTaskModel, tasks: Sequence[Task]) -> None:
    if not tasks:
        raise ConfigError("train_multitask needs at least one task.")
    missing = [t.name for t in tasks if t.name not in model.heads]
    if missing:
        raise ConfigError(f"the model has no head for tasks {missing}; build it from the same task list.")
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"task names {twice} occur more than once; every task needs its own name (it keys its "
                          "head).")
    no_val = [t.name for t in tasks if t.val is None or len(t.val) == 0]
    if no_val:
        raise ConfigError(f"tasks {no_val} have no validation split; early stopping needs one. Split off part "
                          "of the training data as `val`.")
