"""``mtml train`` and ``mtml eval``: from a :class:`~mtml.config.Config` to a finished run directory, and back
(resume, evaluate). Each CLI command is a thin call of one of these functions.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtml.config import Config
from mtml.engine import (
    ProgressHook,
    Run,
    TrainResult,
    broadcast_from_main,
    check_precision,
    check_stop_per_task,
    evaluate,
    is_main,
    load_checkpoint,
    local_device,
    map_ranks,
    restore,
    session,
    train_multitask,
)
from mtml.errors import ConfigError, DivergedError
from mtml.report import Trackers, check_trackers, open_trackers, plot_run
from mtml.workflows._build import (
    Built,
    build,
    default_run_dir,
    read_config,
    resolve_device,
    schedule_of,
    seeded,
    stop_rule,
)
from mtml.workflows._meta import evaluate_meta, fit_meta, judged_steps

__all__ = ["check_restartable", "evaluate_run", "resume_run", "train", "train_seeds"]


@dataclass
class _Prepared:
    """Everything a run needs, built (and so validated) before its directory is created."""

    built: Built
    device: torch.device

    @property
    def config(self) -> Config:
        return self.built.config


def _prepare(config: Config) -> _Prepared:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = local_device(resolve_device(config.device))
    built = build(config)
    check_precision(config.training.precision, device, built.weighting)  # refused before any run directory exists
    check_trackers(tensorboard=config.logging.tensorboard, mlflow=config.logging.mlflow)
    if config.training.stop_per_task and not built.is_meta:
        check_stop_per_task(built.model)  # refused before any run directory exists
    return _Prepared(built, device)


def _fit(prep: _Prepared, run: Run, *, resume: bool, progress: ProgressHook | None) -> TrainResult:
    built, t = prep.built, prep.config.training
    assert built.weighting is not None
    return train_multitask(
        built.model, built.tasks, weighting=built.weighting, optimizer=t.optimizer, lr=t.lr,
        weight_decay=t.weight_decay, batch_size=t.batch_size, stop=stop_rule(prep.config), seed=prep.config.seed,
        device=prep.device, run=run, resume=resume, progress=progress, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, stop_per_task=t.stop_per_task, precision=t.precision,
        scheduler=schedule_of(prep.config), grad_clip=t.grad_clip, accumulate=t.accumulate,
    )


def _run(prep: _Prepared, run: Run, *, resume: bool, progress: ProgressHook | None) -> TrainResult:
    """Train (or resume), then write summary.json and plots and mark the run completed; rank 0 then lets go
    of the run's lock (taken when it created or reopened the run)."""
    trackers = Trackers([])
    status = "failed"
    try:
        if is_main():
            trackers = _trackers(prep.config, run)
        result = _train_into(prep, run, resume=resume, progress=progress, trackers=trackers)
        status = "completed"
        return result
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if trackers:
            run.detach(trackers)
            trackers.close(status)
        if is_main():
            run.unlock()


def _trackers(config: Config, run: Run) -> Trackers:
    """The TensorBoard / MLflow trackers ``logging:`` asks for, attached to ``run`` (rank 0 only)."""
    log = config.logging
    trackers = open_trackers(run.path, config.to_dict(), tensorboard=log.tensorboard, mlflow=log.mlflow,
                             mlflow_uri=log.mlflow_uri, experiment=log.experiment)
    if trackers:
        run.attach(trackers)
    return trackers


def _train_into(prep: _Prepared, run: Run, *, resume: bool, progress: ProgressHook | None,
                trackers: Trackers) -> TrainResult:
    config, built = prep.config, prep.built
    try:
        with seeded(config.seed, prep.device):  # dropout draws follow the run's seed and leave the caller's RNG
            if built.family is not None:
                fitted, val, test = fit_meta(built, run, resume=resume, device=prep.device, progress=progress)
                result = TrainResult(fitted, {"meta_val": val}, {config.data.dataset: test})
                tasks = {config.data.dataset: {"kind": built.family.kind, "algorithm": config.training.algorithm}}
            else:
                result = _fit(prep, run, resume=resume, progress=progress)
                tasks = {t.name: {"kind": t.kind.value, "primary_metric": t.primary_metric} for t in built.tasks}
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: say so in run.json, keep the checkpoints
        if is_main():
            run.set_status("interrupted", stopped=time.time())
        raise
    except DivergedError:
        if is_main():
            run.set_status("diverged", stopped=time.time())
        raise
    except OSError as exc:  # a full disk, a vanished mount: say so where it can still be written; resumable
        if is_main():
            with contextlib.suppress(OSError):
                run.set_status("failed", stopped=time.time(), error=f"{exc.strerror or exc}")
        raise
    model = built.model
    summary = {"name": config.name, "dataset": config.data.dataset, "algorithm": config.training.algorithm,
               **result.summary(), "parameters": sum(p.numel() for p in model.parameters()), "tasks": tasks}
    if is_main():  # in a process group only rank 0 writes the run directory
        run.write_summary(summary)
        trackers.finish(summary)
        plot_run(run.records(), run.plot_dir)
        run.set_status("completed", finished=time.time())
    return result


def train(
    config: Config, out: str | Path | None = None, *, progress: ProgressHook | None = None,
    auto_resume: bool = True, announce: Callable[[str], None] | None = None,
) -> tuple[Run, TrainResult]:
    """Train ``config`` into the run directory ``out`` (default: a new :func:`default_run_dir`).

    Data, model, algorithm, weighting and device are all built first, so a bad setting fails before any
    directory is created. When ``out`` holds an unfinished run of the same config (a crash, a kill, a
    preemption, or torchrun restarting its group), it is continued from its last good checkpoint
    (``auto_resume=False`` refuses any existing directory instead; a changed config is always refused, with
    the differing keys named); ``announce`` gets one line saying so. Started by ``torchrun`` (or ``mtml train
    --nproc N``), every rank trains its share of each batch and rank 0 writes the run directory (see
    docs/distributed.md).
    """
    check_restartable(config, out)
    with session(resolve_device(config.device)):
        prep = _prepare(config)
        target = out or default_run_dir(config)
        run, resume = broadcast_from_main(lambda: _open_run(target, config, auto_resume, announce),
                                          "creating the run directory")
        return run, _run(prep, run, resume=resume, progress=progress)


def _open_run(path: str | Path, config: Config, auto_resume: bool,
              announce: Callable[[str], None] | None) -> tuple[Run, bool]:
    """Rank 0: the run to train into, and whether it resumes from a checkpoint."""
    found = Run.reopen(path, config.to_dict()) if auto_resume else None
    if found is None:
        return Run.create(path, config.to_dict()), False
    found.lock()  # until _run ends (or this process does)
    found.sweep_temporaries()
    latest = found.checkpoints()
    info = found.status()
    was = info.get("status", "unknown")
    found.set_status("running", restarts=int(info.get("restarts", 0)) + 1)
    if not latest:  # it stopped before its first checkpoint: train it again from the start, in place
        found.log({"kind": "restart", "step": 0, "time": time.time()})
        if announce is not None:
            announce(f"{path} holds this config's unfinished run ({was}) with no checkpoint yet: training it "
                     "again from step 0.")
        return found, False
    if announce is not None:
        announce(f"continuing the unfinished run in {path} ({was}) from its checkpoint at step {latest[-1][0]} "
                 "(same config; --no-auto-resume refuses instead).")
    return found, True


def check_restartable(config: Config, out: str | Path | None) -> None:
    """Under ``torchrun --max-restarts K`` (K > 0) a restarted group must find its run and a checkpoint in it:
    :class:`ConfigError` before training when there is no ``--out`` or no checkpoint before the last step."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts <= 0:
        return
    if out is None:
        raise ConfigError(f"torchrun may restart this group ({restarts} restart(s) allowed), but no --out was given: "
                          "each start would train into a new runs/<name>-<time> directory and resume nothing. "
                          "Give --out RUN.")
    t = config.training
    every = t.checkpoint_every or t.eval_every
    if every >= t.max_steps:
        raise ConfigError(f"torchrun may restart this group ({restarts} restart(s) allowed), but the run writes its "
                          f"first checkpoint at its last step (checkpoint_every/eval_every {every} >= max_steps "
                          f"{t.max_steps}), so a restart would start from step 0. Set training.checkpoint_every "
                          "below max_steps.")


def train_seeds(
    config: Config, seeds: list[int], root: str | Path | None = None, *, auto_resume: bool = True
) -> list[tuple[Path, dict[str, Any]]]:
    """One run of ``config`` per seed, into ``root/seed-<seed>`` (default root: :func:`default_run_dir`).

    In a process group (``mtml train --seeds … --nproc N`` or torchrun) the seeds are spread over the ranks
    (each rank trains its runs alone) and every rank gets every ``(run directory, summary)``, in seed order.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct seeds. Got {seeds}.")
    check_restartable(config, root)
    with session(resolve_device(config.device)):
        base = Path(broadcast_from_main(lambda: str(root or default_run_dir(config)), "choosing the run root"))

        def one(seed: int) -> tuple[Path, dict[str, Any]]:
            run, _ = train(config.model_copy(update={"seed": seed}), base / f"seed-{seed}", auto_resume=auto_resume)
            return run.path, run.summary()

        return map_ranks(one, seeds)


def resume_run(path: str | Path, *, progress: ProgressHook | None = None) -> tuple[Run, TrainResult]:
    """Continue the run at ``path`` from its latest checkpoint (its own ``config.yaml`` is used)."""
    run = Run.open(path)
    config = read_config(run)
    with session(resolve_device(config.device)):
        prep = _prepare(config)
        if is_main():
            run.lock()
            run.sweep_temporaries()
            run.set_status("running")
        return run, _run(prep, run, resume=True, progress=progress)


def evaluate_run(
    path: str | Path, split: str = "test", *, num_tasks: int | None = None, shots: int | None = None,
    steps: int | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the best checkpoint of the run at ``path``.

    Joint runs: per-task metrics on ``split``. Meta-learning runs: the meta-test protocol over ``num_tasks``
    held-out tasks with ``shots`` support examples, after 0, 1 and ``steps`` inner steps (mean and 95% CI).
    Started by ``torchrun`` (or ``mtml eval --nproc N``), the episodes (or tasks) are spread over the ranks and
    every rank returns the scores one process computes.
    """
    run = Run.open(path)
    config = read_config(run)
    with session(resolve_device(config.device)):
        return _evaluate_run(run, config, split, num_tasks, shots, steps)


def _evaluate_run(run: Run, config: Config, split: str, num_tasks: int | None, shots: int | None,
                  steps: int | None) -> dict[str, dict[str, float]]:
    ckpt = load_checkpoint(run.best_checkpoint)
    if config.is_meta:
        built = build(config, **({"shots": shots} if shots else {}))
        assert built.algorithm is not None
        restore(ckpt, modules={"model": built.model, "algorithm": built.algorithm})
        k = steps if steps is not None else judged_steps(built.algorithm)
        scores = evaluate_meta(built, num_tasks=num_tasks or config.training.meta_test_tasks,
                               steps=sorted({0, 1, k}) if built.algorithm.uses_inner_steps else [0],
                               seed=config.seed + 2, device=resolve_device(config.device))
        return {config.data.dataset: scores}
    if shots is not None or steps is not None or num_tasks is not None:
        raise ConfigError("--tasks, --shots and --steps apply to meta-learning runs; this is a joint run.")
    built = build(config)
    restore(ckpt, modules={"model": built.model})
    return evaluate(built.model, [t for t in built.tasks if getattr(t, split) is not None], split, map_fn=map_ranks)
