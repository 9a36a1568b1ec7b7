"""From a :class:`~mtml.config.Config` to a finished run directory, and back (resume, evaluate).

These are the functions behind ``mtml train`` and ``mtml eval``; each CLI command is a thin call of one.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path

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
from mtml.errors import ConfigError
from mtml.nn import MultiTaskModel, build_multitask_model
from mtml.report.plots import plot_learning_curves
from mtml.tasks import Task
from mtml.weighting import WEIGHTINGS

__all__ = ["Experiment", "build", "default_run_dir", "evaluate_run", "resume_run", "train"]


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
    torch.manual_seed(config.seed)
    m = config.model
    model = build_multitask_model(tasks, trunk_hidden=m.trunk_hidden, head_hidden=m.head_hidden,
                                  stem_width=m.stem_width, activation=m.activation, dropout=m.dropout,
                                  share_trunk=m.share_trunk)
    return Experiment(config, tasks, model)


def default_run_dir(config: Config, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (with a counter if that exists already)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.name) or "run"
    base = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _fit(exp: Experiment, run: Run, *, resume: bool, progress: ProgressHook | None) -> TrainResult:
    t = exp.config.training
    weighting = WEIGHTINGS.create(t.weighting.name, [task.name for task in exp.tasks],
                                  where="training.weighting.options", **t.weighting.options)
    stop = StopRule(max_steps=t.max_steps, eval_every=t.eval_every, patience=t.patience, min_delta=t.min_delta)
    result = train_multitask(
        exp.model, exp.tasks, weighting=weighting, optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
        batch_size=t.batch_size, stop=stop, seed=exp.config.seed, device=resolve_device(exp.config.device),
        run=run, resume=resume, progress=progress,
    )
    summary = {"name": exp.config.name, "dataset": exp.config.data.dataset, **result.summary(),
               "parameters": sum(p.numel() for p in exp.model.parameters()),
               "tasks": {task.name: {"kind": task.kind.value, "primary_metric": task.primary_metric}
                         for task in exp.tasks}}
    run.write_summary(summary)
    plot_learning_curves(run.records(), run.plot_dir)
    run.set_status("completed", finished=time.time())
    return result


def train(config: Config, out: str | Path | None = None, *, progress: ProgressHook | None = None) -> tuple[Run, TrainResult]:
    """Train ``config`` into a new run directory ``out`` (default: :func:`default_run_dir`)."""
    exp = build(config)
    run = Run.create(out or default_run_dir(config), config.to_dict())
    return run, _fit(exp, run, resume=False, progress=progress)


def resume_run(path: str | Path, *, progress: ProgressHook | None = None) -> tuple[Run, TrainResult]:
    """Continue the run at ``path`` from its latest checkpoint (its own ``config.yaml`` is used)."""
    run = Run.open(path)
    config = Config.from_dict(run.config(), source=str(run.path / "config.yaml"))
    exp = build(config)
    run.set_status("running")
    return run, _fit(exp, run, resume=True, progress=progress)


def evaluate_run(path: str | Path, split: str = "test") -> dict[str, dict[str, float]]:
    """Per-task metrics on ``split`` of the best checkpoint of the run at ``path``."""
    run = Run.open(path)
    config = Config.from_dict(run.config(), source=str(run.path / "config.yaml"))
    exp = build(config)
    ckpt = load_checkpoint(run.best_checkpoint)
    restore(ckpt, modules={"model": exp.model})
    return evaluate(exp.model, [t for t in exp.tasks if getattr(t, split) is not None], split)
