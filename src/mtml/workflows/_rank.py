"""``mtml rank``: rank candidate source runs for a target config by transferability estimates.

For each source run directory the model is rebuilt from its ``config.yaml`` and best checkpoint; on the target
tasks' data it gives trunk features (``model.features``) and, from a classification head, class probabilities.
Every estimator of :data:`mtml.transfer.ESTIMATORS` that applies to the target task's kind is then computed.
No fine-tuning happens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtml.config import Config
from mtml.errors import ConfigError, ShapeError, UnknownNameError
from mtml.tasks import Task
from mtml.transfer import ESTIMATORS, Source, estimate_all, head_probs
from mtml.workflows._build import load_source, target_tasks

__all__ = ["rank_sources", "source_outputs"]

#: how torch words a model reading inputs of the wrong shape (``mat1 and mat2 shapes cannot be multiplied``,
#: ``size mismatch``, ``Expected 4-dimensional input``, ``must match the size of tensor``)
_SHAPE_WORDS = re.compile(r"shape|size|dimension", re.IGNORECASE)


@torch.no_grad()
def source_outputs(source: Source, x: torch.Tensor, head: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trunk features ``[n, d]`` of target inputs ``x: [n, in]`` and, when ``head`` is given, its class
    probabilities ``[n, c_s]`` (``None`` for a regression or multilabel head)."""
    try:
        feats = source.model.features(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not _SHAPE_WORDS.search(first):  # not a mismatch of inputs: a real failure, shown as itself
            raise
        raise ShapeError(f"source run {source.label} cannot read the target inputs of shape {tuple(x.shape)} "
                         f"({first}); sources must take the same input features as the target.") from None
    probs = head_probs(source.model.heads[head](feats), source.kinds[head]) if head is not None else None
    return feats, probs


def _target_tasks(target: Config, task: str | None) -> list[Task]:
    if target.is_meta:
        raise ConfigError("--target must be a joint (multi-task) config: its tasks' data are the target.")
    tasks = target_tasks(target)
    if task is None:
        return tasks
    chosen = [t for t in tasks if t.name == task]
    if not chosen:
        raise UnknownNameError(f"target has no task '{task}'; its tasks: {', '.join(t.name for t in tasks)}.")
    return chosen


def _subsample(task: Task, split: str, max_examples: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = task.split(split)
    if max_examples is None or len(s) <= max_examples:
        return s.x, s.y
    idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))[:max_examples]
    return s.x[idx], s.y[idx]


def rank_sources(
    target: Config, runs: Sequence[str | Path], *, task: str | None = None, source_task: str | None = None,
    split: str = "train", by: str = "logme", max_examples: int | None = 5000,
) -> dict[str, list[dict[str, Any]]]:
    """For each target task (or only ``task``): one row per source run — ``{"run", "source_task", "scores"}`` with
    every estimator's value (``None`` where it does not apply) — sorted by ``by``, best first."""
    if not runs:
        raise ConfigError("give at least one source RUN directory to rank.")
    ESTIMATORS.get(by)  # an unknown name lists the valid ones
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test. Got {split!r}.")
    sources = [load_source(r)[0] for r in runs]
    table: dict[str, list[dict[str, Any]]] = {}
    for t in _target_tasks(target, task):
        x, y = _subsample(t, split, max_examples, target.seed)
        rows = []
        for src in sources:
            head = src.classification_head(source_task)
            feats, probs = source_outputs(src, x, head)
            rows.append((src.label, head, estimate_all(feats, probs, y, t.kind.value)))
        rows.sort(key=lambda r: -v if (v := r[2][by]) is not None else float("inf"))
        table[t.name] = [{"run": p, "source_task": h, "scores": s} for p, h, s in rows]
    return table
