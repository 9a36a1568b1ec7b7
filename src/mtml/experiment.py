"""From a :class:`~mtml.config.Config` to a finished run directory, and back (resume, evaluate).

These are the functions behind ``mtml train`` and ``mtml eval``; each CLI command is a thin call of one.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtml.config import Config
from mtml.datasets import DATASETS
from mtml.engine import (
    ProgressHook,
    Run,
    StopRule,
    TrainResult,
    evaluate,
    load_checkpoint,
    restore,
    train_multitask,
)
from mtml.engine.distributed import broadcast_from_main, is_main, local_device, map_ranks, session
from mtml.engine.trainer import check_stop_per_task
from mtml.errors import ConfigError
from mtml.experiment_meta import MetaExperiment, build_meta, evaluate_meta, fit_meta, judged_steps
from mtml.groups import task_groups
from mtml.nn import ARCHITECTURES, MultiTaskModel
from mtml.nn.hierarchical import build_hierarchical
from mtml.report.plots import plot_learning_curves
from mtml.tasks import Task
from mtml.weighting import WEIGHTINGS, Weighting

__all__ = ["Experiment", "build", "default_run_dir", "evaluate_run", "resume_run", "train", "train_seeds"]


@dataclass
class Experiment:
    """Everything built from a config: tasks and model (weighting and optimiser are built by the trainer)."""

    config: Config
    tasks: list[Task]
    model: MultiTaskModel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA GPU; use device: cpu.")
    return device


def build(config: Config) -> Experiment:
    """Build tasks (from the dataset registry) and the model of ``config``, seeded by ``config.seed``."""
    opts = dict(config.data.options)
    if "seed" in inspect.signature(DATASETS.get(config.data.dataset)).parameters:
        opts.setdefault("seed", config.seed)  # the dataset's split follows the run's seed unless given
    tasks = DATASETS.create(config.data.dataset, where="data.options", **opts)
    task_groups(tasks)  # tasks declared on shared rows must hold the same rows: checked before any run exists
    torch.manual_seed(config.seed)
    m = config.model
    if m.head == "hierarchical" and m.share_trunk:
        return Experiment(config, tasks, _hierarchical(config, tasks))
    extra: dict[str, Any] = {}
    if m.architecture == "hps":
        extra = {"share_trunk": m.share_trunk, "backbone": m.backbone, "backbone_options": m.backbone_options}
    model = ARCHITECTURES.create(m.architecture, tasks, where="model.options", trunk_hidden=m.trunk_hidden,
                                 head_hidden=m.head_hidden, stem_width=m.stem_width, activation=m.activation,
                                 dropout=m.dropout, **extra, **m.options)
    return Experiment(config, tasks, model)


def _hierarchical(config: Config, tasks: list[Task]) -> MultiTaskModel:
    """The hierarchical-heads model of ``config`` (hard sharing, MLP trunk); ``share_trunk: false`` (the
    single-task baseline) builds independent heads instead."""
    m = config.model
    if m.architecture != "hps" or m.backbone != "mlp" or m.head_hidden or m.options:
        raise ConfigError("model.head: hierarchical takes the hps architecture with an MLP trunk and linear heads: "
                          "remove model.architecture/backbone/head_hidden/options or use head: independent.")
    unknown = set(m.head_options) - {"random"}
    if unknown:
        raise ConfigError(f"model.head_options: unknown keys {sorted(unknown)}; the hierarchical head takes random.")
    return build_hierarchical(tasks, trunk_hidden=m.trunk_hidden, stem_width=m.stem_width, activation=m.activation,
                              dropout=m.dropout, random=m.head_options.get("random", "all"))


def default_run_dir(config: Config, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (with a counter if that exists already)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.name) or "run"
    base = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


@dataclass
class _Prepared:
    """Everything a run needs, built (and so validated) before its directory is created."""

    config: Config
    device: torch.device
    exp: Experiment | None = None
    weighting: Weighting | None = None
    meta: MetaExperiment | None = None


def _prepare(config: Config) -> _Prepared:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = local_device(resolve_device(config.device))
    if config.is_meta:
        return _Prepared(config, device, meta=build_meta(config))
    exp = build(config)
    if config.training.stop_per_task:
        check_stop_per_task(exp.model)  # refused before any run directory exists
    w = config.training.weighting
    options = {**w.options, **({"gramian": w.gramian} if w.gramian else {})}
    weighting = WEIGHTINGS.create(w.name, [task.name for task in exp.tasks], where="training.weighting.options",
                                  **options)
    return _Prepared(config, device, exp=exp, weighting=weighting)


def _fit(prep: _Prepared, run: Run, *, resume: bool, progress: ProgressHook | None) -> TrainResult:
    assert prep.exp is not None and prep.weighting is not None
    exp, t = prep.exp, prep.config.training
    stop = StopRule(max_steps=t.max_steps, eval_every=t.eval_every, patience=t.patience, min_delta=t.min_delta)
    return train_multitask(
        exp.model, exp.tasks, weighting=prep.weighting, optimizer=t.optimizer, lr=t.lr,
        weight_decay=t.weight_decay, batch_size=t.batch_size, stop=stop, seed=exp.config.seed, device=prep.device,
        run=run, resume=resume, progress=progress, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, stop_per_task=t.stop_per_task,
    )


def _run(prep: _Prepared, run: Run, *, resume: bool, progress: ProgressHook | None) -> TrainResult:
    """Train (or resume), then write summary.json and plots and mark the run completed."""
    config = prep.config
    if prep.meta is not None:
        fitted, val, test = fit_meta(prep.meta, run, resume=resume, device=prep.device, progress=progress)
        result = TrainResult(fitted, {"meta_val": val}, {config.data.dataset: test})
        model: torch.nn.Module = prep.meta.model
        tasks = {config.data.dataset: {"kind": prep.meta.source.kind, "algorithm": config.training.algorithm}}
    else:
        assert prep.exp is not None
        result = _fit(prep, run, resume=resume, progress=progress)
        model = prep.exp.model
        tasks = {t.name: {"kind": t.kind.value, "primary_metric": t.primary_metric} for t in prep.exp.tasks}
    summary = {"name": config.name, "dataset": config.data.dataset, "algorithm": config.training.algorithm,
               **result.summary(), "parameters": sum(p.numel() for p in model.parameters()), "tasks": tasks}
    if is_main():  # in a process group only rank 0 writes the run directory
        run.write_summary(summary)
        plot_learning_curves(run.records(), run.plot_dir)
        run.set_status("completed", finished=time.time())
    return result


def train(
    config: Config, out: str | Path | None = None, *, progress: ProgressHook | None = None
) -> tuple[Run, TrainResult]:
    """Train ``config`` into a new run directory ``out`` (default: :func:`default_run_dir`).

    Data, model, algorithm, weighting and device are all built first, so a bad setting fails before any
    directory is created. Started by ``torchrun`` (or ``mtml train --nproc N``), every rank trains its share
    of each batch and rank 0 writes the run directory (see docs/distributed.md).
    """
    with session(resolve_device(config.device)):
        prep = _prepare(config)
        run = broadcast_from_main(lambda: Run.create(out or default_run_dir(config), config.to_dict()),
                                  "creating the run directory")
        return run, _run(prep, run, resume=False, progress=progress)


def train_seeds(
    config: Config, seeds: list[int], root: str | Path | None = None
) -> list[tuple[Path, dict[str, Any]]]:
    """One run of ``config`` per seed, into ``root/seed-<seed>`` (default root: :func:`default_run_dir`).

    In a process group (``mtml train --seeds … --nproc N`` or torchrun) the seeds are spread over the ranks
    (each rank trains its runs alone) and every rank gets every ``(run directory, summary)``, in seed order.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct seeds. Got {seeds}.")
    with session(resolve_device(config.device)):
        base = Path(broadcast_from_main(lambda: str(root or default_run_dir(config)), "choosing the run root"))

        def one(seed: int) -> tuple[Path, dict[str, Any]]:
            run, _ = train(config.model_copy(update={"seed": seed}), base / f"seed-{seed}")
            return run.path, run.summary()

        return map_ranks(one, seeds)


def _load_config(run: Run) -> Config:
    return Config.from_dict(run.config(), source=str(run.path / "config.yaml"))


def resume_run(path: str | Path, *, progress: ProgressHook | None = None) -> tuple[Run, TrainResult]:
    """Continue the run at ``path`` from its latest checkpoint (its own ``config.yaml`` is used)."""
    run = Run.open(path)
    config = _load_config(run)
    with session(resolve_device(config.device)):
        prep = _prepare(config)
        if is_main():
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
    config = _load_config(run)
    with session(resolve_device(config.device)):
        return _evaluate_run(run, config, split, num_tasks, shots, steps)


def _evaluate_run(run: Run, config: Config, split: str, num_tasks: int | None, shots: int | None,
                  steps: int | None) -> dict[str, dict[str, float]]:
    ckpt = load_checkpoint(run.best_checkpoint)
    if config.is_meta:
        mexp = build_meta(config, **({"shots": shots} if shots else {}))
        restore(ckpt, modules={"model": mexp.model, "algorithm": mexp.algorithm})
        k = steps if steps is not None else judged_steps(mexp.algorithm)
        scores = evaluate_meta(mexp, num_tasks=num_tasks or config.training.meta_test_tasks,
                               steps=sorted({0, 1, k}) if mexp.algorithm.uses_inner_steps else [0],
                               seed=config.seed + 2, device=resolve_device(config.device))
        return {config.data.dataset: scores}
    if shots is not None or steps is not None or num_tasks is not None:
        raise ConfigError("--tasks, --shots and --steps apply to meta-learning runs; this is a joint run.")
    exp = build(config)
    restore(ckpt, modules={"model": exp.model})
    return evaluate(exp.model, [t for t in exp.tasks if getattr(t, split) is not None], split)
