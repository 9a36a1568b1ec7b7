"""The training loop: steps, periodic validation, early stopping, checkpoints, resume, progress.

:func:`fit` is algorithm-agnostic: it calls a ``train_step`` closure (one optimiser update) and a ``validate``
closure (returns ``objective``, lower is better). Joint multi-task training and meta-learning both plug in here;
users with their own loop can call the step functions directly instead.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import mtml.engine._preempt as preempt
from mtml.engine._checkpoint import Checkpoint, load_checkpoint, load_state, restore, save_checkpoint
from mtml.engine._distributed import all_reduce_, broadcast_from_main, fault_point, is_main, stop_agreed
from mtml.engine._run import Run
from mtml.engine._updates import Updater
from mtml.errors import CheckpointError, ConfigError, DivergedError, MtmlError

__all__ = ["FitResult", "ProgressHook", "StopRule", "fit"]


class ProgressHook(Protocol):
    """Receives progress from :func:`fit` (the CLI shows a rich progress bar through one)."""

    def start(self, total: int, completed: int) -> None: ...
    def update(self, step: int, info: Mapping[str, Any]) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class StopRule:
    """When to stop: after ``max_steps``, or when the validation objective has not improved by more than
    ``min_delta`` for ``patience`` consecutive validations (``patience=0`` disables early stopping)."""

    max_steps: int = 1000
    eval_every: int = 50
    patience: int = 10
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1. Got {getattr(self, name)}.")
        if self.patience < 0:
            raise ConfigError(f"`patience` must be >= 0. Got {self.patience}.")
        if not self.min_delta >= 0:
            raise ConfigError(f"`min_delta` must be >= 0. Got {self.min_delta}.")


@dataclass
class FitResult:
    steps: int = 0
    best_step: int = 0
    best_objective: float = math.inf
    bad_evals: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(
    *,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    train_step: Callable[[], Mapping[str, Any]],
    validate: Callable[[], Mapping[str, Any]],
    stop: StopRule,
    generators: Mapping[str, torch.Generator] | None = None,
    run: Run | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    log_every: int = 10,
    progress: ProgressHook | None = None,
    updater: Updater | None = None,
) -> FitResult:
    """Train until ``stop`` says so, then restore the best validated state of ``modules``.

    ``train_step()`` performs one update and returns scalars to log (``loss`` at least); ``validate()`` returns
    ``objective`` (lower is better) and anything else to log, optionally with ``improved`` (bool): whether this
    validation counts as an improvement for early stopping and the best state, in place of comparing
    ``objective`` with the best so far (a caller with its own notion of "better" sets it), and ``stop`` (bool):
    end training after this validation. With ``run``,
    validations and every ``log_every``-th step are appended to ``metrics.jsonl``, a checkpoint is written every
    ``checkpoint_every`` steps (default: each validation) and the best state is kept as ``best.safetensors``;
    ``resume=True`` continues from the run's latest checkpoint. ``updater`` (the :class:`~._updates.Updater`
    that ``train_step`` updates through, if any) gets each validation objective (a plateau schedule), and its
    schedule's state travels in the checkpoints.

    In a process group every rank runs the loop (steps and validations are collective); only rank 0 writes
    to ``run`` and shows progress, and on resume it reads the checkpoint and hands it to the others.
    """
    generators = dict(generators or {})
    writer = run if is_main() else None
    progress = progress if is_main() else None
    result = FitResult()
    best_state = _snapshot(modules)
    if resume:
        result, best_state = _resume(run, modules, optimizer, generators, updater)
    run = writer
    every = checkpoint_every or stop.eval_every
    t0 = time.perf_counter() - result.seconds
    if progress is not None:
        progress.start(stop.max_steps, result.steps)
    try:
        with preempt.stop_window():  # SIGTERM now stops after the step in progress, with a checkpoint of it
            while result.steps < stop.max_steps and not result.stopped_early:
                if not all(m.training for m in modules.values()):  # validation left them in eval mode
                    _train_mode(modules, True)  # (a recursive walk: 30 us a step for a MAML model and algorithm)
                tallied = preempt.tallies()
                info = dict(train_step())
                result.steps += 1
                step = result.steps
                fault_point(step)
                if run is not None and (step % log_every == 0 or step == 1):
                    run.log({"kind": "train", "step": step, **info})
                if step % stop.eval_every == 0 or step == stop.max_steps:
                    best_state = _validate(validate, modules, stop, result, run, best_state, info)
                    if updater is not None:
                        updater.validated(info["val"])
                if progress is not None:
                    progress.update(step, {**info, "best": result.best_objective})
                saved = False
                if run is not None and (step % every == 0 or result.stopped_early):
                    saved = True
                    result.seconds = time.perf_counter() - t0
                    _save(run, modules, optimizer, generators, result, keep_checkpoints, updater)
                if stop_agreed(tallied):
                    _preempted(run, modules, optimizer, generators, result, keep_checkpoints, saved, t0, updater)
    finally:
        if progress is not None:
            progress.stop()
    result.seconds = time.perf_counter() - t0
    _load_snapshot(modules, best_state)
    if run is not None:
        run.log({"kind": "done", "step": result.steps, "best_step": result.best_step,
                 "best_objective": result.best_objective, "stopped_early": result.stopped_early,
                 "seconds": result.seconds})
    return result


def _validate(
    validate: Callable[[], Mapping[str, Any]],
    modules: Mapping[str, nn.Module],
    stop: StopRule,
    result: FitResult,
    run: Run | None,
    best_state: dict[str, dict[str, torch.Tensor]],
    info: dict[str, Any],
) -> dict[str, dict[str, torch.Tensor]]:
    _train_mode(modules, False)
    with torch.no_grad():
        val = dict(validate())
    improved = val.pop("improved", None)
    stop_now = bool(val.pop("stop", False))
    objective = float(val["objective"])
    if not math.isfinite(objective):
        raise DivergedError(
            f"validation objective became {objective} at step {result.steps}: training diverged. Lower the "
            "learning rate (or the inner-loop rate and steps), or check the data for extreme values. The run's "
            "checkpoints up to the last good validation are kept."
        )
    record = {"kind": "val", "step": result.steps, **val}
    result.history.append(record)
    if run is not None:
        run.log(record)
    if improved is None:
        improved = objective < result.best_objective - stop.min_delta
    if improved:
        result.best_objective, result.best_step, result.bad_evals = objective, result.steps, 0
        best_state = _snapshot(modules)
        if run is not None:
            save_checkpoint(run.best_checkpoint, modules=modules, meta={"step": result.steps,
                                                                          "objective": objective})
    else:
        result.bad_evals += 1
        if stop.patience and result.bad_evals >= stop.patience:
            result.stopped_early = True
    if stop_now:  # the caller's own stopping rule (per-task early stopping: every task has stopped)
        result.stopped_early = True
    info["val"] = objective
    return best_state


def _snapshot(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}


def _load_snapshot(modules: Mapping[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, module in modules.items():
        load_state(module, state[name])


def _train_mode(modules: Mapping[str, nn.Module], training: bool) -> None:
    for m in modules.values():
        m.train(training)


def _save(run: Run, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
          generators: Mapping[str, torch.Generator], result: FitResult, keep: int, updater: Updater | None) -> None:
    meta: dict[str, Any] = {"step": result.steps, "fit": {k: v for k, v in asdict(result).items() if k != "history"}}
    if updater is not None:
        meta["updates"] = updater.state_dict()
    save_checkpoint(run.step_checkpoint(result.steps), modules=modules, optimizer=optimizer,
                    generators=generators, meta=meta)
    run.prune_checkpoints(keep)


def _preempted(run: Run | None, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
               generators: Mapping[str, torch.Generator], result: FitResult, keep: int, saved: bool,
               t0: float, updater: Updater | None) -> None:
    """Stop after a SIGTERM: rank 0 checkpoints this step (unless it just did), every rank waits for that
    file, then :class:`~._preempt.Terminated` ends the run the way Ctrl-C does."""
    if run is not None:
        if not saved:
            result.seconds = time.perf_counter() - t0
            _save(run, modules, optimizer, generators, result, keep, updater)
        run.log({"kind": "preempted", "step": result.steps, "time": time.time()})
    with contextlib.suppress(MtmlError):  # the other ranks leave once rank 0's checkpoint is on disk
        all_reduce_(torch.zeros(1), "waiting for rank 0's checkpoint")
    where = run.path if run is not None else "RUN"
    raise preempt.Terminated(f"terminated at step {result.steps}: checkpoint written; run the same command again "
                             f"(or `mtml train --resume {where}`) to continue from it.")


def _resume(run: Run | None, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
            generators: Mapping[str, torch.Generator],
            updater: Updater | None) -> tuple[FitResult, dict[str, dict[str, torch.Tensor]]]:
    if run is None:
        raise ConfigError("resume=True needs a run directory to resume from.")
    latest, ckpt, best = broadcast_from_main(lambda: _read_resume(run), "sharing the checkpoint to resume from")
    restore(ckpt, modules=modules, optimizer=optimizer, generators=generators)
    if updater is not None:
        updater.load_state_dict(ckpt.meta.get("updates", {}))
    result = FitResult(**ckpt.meta["fit"])
    best_state = _snapshot(modules)
    if best is not None:
        best_state = {name: best.module_state(name) for name in modules}
    if is_main():
        run.log({"kind": "resume", "step": result.steps, "checkpoint": latest, "time": time.time()})
    return result, best_state


def _read_resume(run: Run) -> tuple[str, Checkpoint, Checkpoint | None]:
    """The latest step checkpoint's name, it, and the best checkpoint (read by rank 0, sent to the others)."""
    latest = run.latest_checkpoint()
    if latest is None:
        raise CheckpointError(f"{run.path} has no checkpoint to resume from; start it again with a new --out.")
    best = load_checkpoint(run.best_checkpoint) if run.best_checkpoint.exists() else None
    return latest.name, load_checkpoint(latest), best
