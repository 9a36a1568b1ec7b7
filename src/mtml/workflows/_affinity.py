"""``mtml affinity``: train a joint config while recording TAG inter-task affinity, then suggest task groups.

The run directory is an ordinary joint run (``config.yaml``, ``metrics.jsonl``, checkpoints, ``summary.json``)
plus ``affinity.json`` (mean affinity matrix, its standard error, negative-transfer pairs, the best grouping for
each number of groups) and ``plots/affinity.png`` (the heatmap).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtml.atomic import atomic_write_text
from mtml.config import Config
from mtml.engine import ProgressHook, Run, TrainResult, train_multitask
from mtml.errors import ConfigError
from mtml.report import plot_affinity, plot_run
from mtml.transfer import Grouping, TagRecorder, group_tasks, negative_transfer
from mtml.workflows._build import build, default_run_dir, resolve_device, seeded, stop_rule

__all__ = ["AffinityResult", "task_affinity"]


@dataclass
class AffinityResult:
    """What :func:`task_affinity` measured. ``matrix[i][j]``: mean affinity of task i onto task j."""

    run: Run
    names: list[str]
    matrix: list[list[float]]
    stderr: list[list[float]]
    steps_recorded: int
    groupings: dict[int, Grouping]
    suggested: int
    negative: list[tuple[str, str]]
    train: TrainResult

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.names, "matrix": self.matrix, "stderr": self.stderr, "steps_recorded": self.steps_recorded,
            "definition": "A[i][j] = 1 - L_j(shared after an SGD step on L_i) / L_j(shared), mean over recorded steps",
            "negative_transfer": [{"from": a, "to": b} for a, b in self.negative],
            "groupings": {str(k): {"groups": g.named(self.names), "score": g.score, "method": g.method}
                          for k, g in self.groupings.items()},
            "suggested_groups": self.suggested,
        }


def _group_counts(groups: int | Sequence[int] | None, m: int) -> list[int]:
    ks = list(range(1, min(m, 4) + 1)) if groups is None else [groups] if isinstance(groups, int) else list(groups)
    bad = [k for k in ks if not 1 <= k <= m]
    if bad:
        raise ConfigError(f"--groups must be between 1 and the number of tasks ({m}). Got {bad[0]}.")
    return ks


def task_affinity(
    config: Config, out: str | Path | None = None, *, groups: int | Sequence[int] | None = None, every: int = 10,
    lookahead_lr: float | None = None, progress: ProgressHook | None = None,
) -> AffinityResult:
    """Train ``config`` jointly into a new run directory, recording TAG affinity every ``every`` steps with a
    lookahead SGD step of ``lookahead_lr`` (default: ``training.lr``); group the tasks into each of ``groups``
    (default 1..4) groups and suggest the count with the highest score."""
    if config.is_meta:
        raise ConfigError(f"training.algorithm '{config.training.algorithm}' is meta-learning; task affinity is "
                          "recorded during joint training. Use a config with algorithm: joint.")
    if every < 1:
        raise ConfigError(f"--every must be >= 1. Got {every}.")
    if config.threads:
        torch.set_num_threads(config.threads)
    built, t = build(config), config.training
    names = [task.name for task in built.tasks]
    if len(names) < 2:
        raise ConfigError(f"task affinity needs at least 2 tasks; data.dataset '{config.data.dataset}' has 1.")
    ks = _group_counts(groups, len(names))
    assert built.weighting is not None
    device = resolve_device(config.device)
    recorder = TagRecorder(built.model, built.tasks, lr=lookahead_lr or t.lr, every=every)
    if out is None:
        base = default_run_dir(config)
        out = base.with_name(base.name + "-affinity")
    run = Run.create(out, config.to_dict())
    with seeded(config.seed, device):
        trained = train_multitask(
            built.model, built.tasks, weighting=built.weighting, optimizer=t.optimizer, lr=t.lr,
            weight_decay=t.weight_decay, batch_size=t.batch_size, seed=config.seed, device=device, run=run,
            progress=progress, stop=stop_rule(config), checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints, before_step=recorder,
        )
    result = _result(run, names, recorder, ks, trained)
    _write(run, config, result)
    return result


def _result(run: Run, names: list[str], recorder: TagRecorder, ks: list[int], trained: TrainResult) -> AffinityResult:
    acc = recorder.accumulator
    mean, se = acc.mean(), acc.stderr()
    groupings = {k: group_tasks(mean, k) for k in ks}
    suggested = max(ks, key=lambda k: (round(groupings[k].score, 12), -k))
    flags = negative_transfer(mean, se)
    negative = [(names[i], names[j]) for i, j in flags.nonzero().tolist()]
    return AffinityResult(run, names, mean.tolist(), se.tolist(), acc.count, groupings, suggested, negative, trained)


def _write(run: Run, config: Config, result: AffinityResult) -> None:
    atomic_write_text(run.path / "affinity.json", json.dumps(result.as_dict(), indent=2) + "\n")
    plot_affinity(result.matrix, result.names, run.plot_dir / "affinity.png",
                  flagged=set(result.negative), groups=result.groupings[result.suggested].named(result.names))
    summary = {"name": config.name, "dataset": config.data.dataset, "algorithm": "joint", **result.train.summary(),
               "affinity": {"suggested_groups": result.groupings[result.suggested].named(result.names),
                            "steps_recorded": result.steps_recorded}}
    run.write_summary(summary)
    plot_run(run.records(), run.plot_dir)
    run.set_status("completed", finished=time.time())
