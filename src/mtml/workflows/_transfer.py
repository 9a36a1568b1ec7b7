"""``mtml transfer``: carry a trained run to the tasks of another config with every transfer strategy.

For each training-set size (k examples per class for classification, k examples for regression, or ``"all"``)
and each of ``repeats`` random draws of those examples, every strategy of :mod:`mtml.transfer._strategies` is fitted
on the drawn examples of every target task and scored on the task's test split. A repeat's score is the mean of
the tasks' primary metric; strategies see the same draws, so their gains over ``scratch`` are paired per repeat,
with 95% Student-t intervals over the repeats. A gain whose interval lies entirely below 0 is flagged as negative
transfer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtml.atomic import atomic_write_text, is_free_dir
from mtml.config import Config, load_config
from mtml.engine import broadcast_from_main, is_distributed, is_main, map_ranks, session
from mtml.errors import ConfigError, RunExistsError
from mtml.meta import mean_ci
from mtml.nn import HierarchicalModel
from mtml.report import plot_transfer, transfer_markdown
from mtml.tasks import Split, Task, TaskKind
from mtml.transfer import STRATEGIES, Source, Strategy, trunk_blocks
from mtml.workflows._build import load_source, target_tasks, task_family

__all__ = ["TransferResult", "check_output_dir", "parse_sizes", "subsample", "t_critical", "transfer",
           "write_outputs"]

Size = int | str
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_critical(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (table to 10, then a series)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def parse_sizes(sizes: Sequence[Size] | str) -> list[Size]:
    """``[1, 5, 20, "all"]`` from a list or a string ``"1,5,20,all"``; sizes must be integers >= 1 or ``all``."""
    items = sizes.split(",") if isinstance(sizes, str) else list(sizes)
    out: list[Size] = []
    for item in items:
        text = str(item).strip()
        value: Size | None = "all" if text == "all" else int(text) if text.isdigit() and not isinstance(
            item, bool) else None
        if value is None or value == 0:
            raise ConfigError(f"sizes: {item!r} is not a training-set size; use integers >= 1 (examples per class, "
                              "or per task for regression) and 'all', e.g. 1,5,20,all.")
        if value not in out:
            out.append(value)
    if not out:
        raise ConfigError("sizes: give at least one size, e.g. 1,5,20,all.")
    return out


def _episode_tasks(family: Any, generator: torch.Generator) -> list[Task]:
    """The tasks of one test episode of ``family``, support → train, query → test."""
    episode = family.test.sample(generator)
    kind = "multiclass" if episode.is_classification else "regression"
    s, q = episode.support, episode.query
    return [Task(f"episode_task_{i}", TaskKind(kind), Split(s.x[i], s.y[i]), test=Split(q.x[i], q.y[i]),
                 num_outputs=episode.ways or 0) for i in range(episode.num_tasks)]


def subsample(task: Task, size: Size, generator: torch.Generator) -> Task:
    """``task`` with ``size`` training examples per class (multiclass, binary) or in all (regression,
    multilabel), drawn without replacement; classes with fewer keep all theirs. ``"all"`` keeps everything."""
    n = len(task.train)
    if size == "all":
        return task
    k = int(size)
    if task.kind in (TaskKind.MULTICLASS, TaskKind.BINARY):
        labels = task.train.y.long().reshape(-1)
        parts = []
        for c in labels.unique():
            rows = (labels == c).nonzero().reshape(-1)
            parts.append(rows[torch.randperm(len(rows), generator=generator)[:k]])
        idx = torch.cat(parts)
    else:
        idx = torch.randperm(n, generator=generator)[:k]
    return Task(task.name, task.kind, Split(task.train.x[idx], task.train.y[idx]), test=task.test,
                num_outputs=task.num_outputs, loss=task.loss, metrics=task.metrics)


@dataclass
class TransferResult:
    """Scores per ``metric → strategy → size`` (``mean``, ``ci95``, per-repeat ``values``, mean ``n_train``)
    and gains over scratch per ``metric → strategy → size`` (``mean``, ``ci95``, ``verdict``)."""

    source: str
    target: str
    sizes: list[Size]
    strategies: list[str]
    repeats: int
    seed: int
    higher_is_better: dict[str, bool]
    scores: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    gains: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=True)


def _verdict(mean: float, ci: float) -> str:
    if math.isnan(ci):
        return "one repeat: no interval"
    if mean + ci < 0:
        return "negative transfer"
    return "gain" if mean - ci > 0 else "no clear difference"


def _check(source: Source, tasks: Sequence[Task], chosen: Mapping[str, Strategy]) -> None:
    shapes = {source.model.input_shapes[n] for n in source.model.task_names if n in source.model.input_shapes}
    for task in tasks:
        if shapes and task.input_shape not in shapes:
            raise ConfigError(f"target task '{task.name}' has inputs of shape {task.input_shape} but the source "
                              f"model takes {sorted(shapes)[0]}; transfer needs the same input features "
                              "(the same columns, image size or embedding).")
        if task.test is None:
            raise ConfigError(f"target task '{task.name}' has no test split to score the strategies on.")
    if source.algorithm is None and any(s.needs_algorithm for s in chosen.values()):
        raise ConfigError("strategy 'meta_adapt' needs a meta-learned source run, but this run was trained "
                          "jointly; drop meta_adapt from the strategies.")
    for strategy in chosen.values():  # a strategy that cannot serve this source or target says so before any work
        for task in tasks:
            refusal = strategy.refusal(source, task)
            if refusal is not None:
                raise ConfigError(refusal)


def _score(strategy: Strategy, source: Source, tasks: Sequence[Task], seed: int) -> dict[str, float]:
    """Mean primary metric over ``tasks`` (grouped by metric name) of ``strategy`` fitted on each task."""
    per: dict[str, list[float]] = {}
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(seed * 7919 + i)
        predictor = strategy.fit(source, task, generator=g)
        assert task.test is not None
        with torch.no_grad():
            metrics = task.compute_metrics(predictor(task.test.x), task.test.y)
        per.setdefault(task.primary_metric, []).append(metrics[task.primary_metric])
    return {m: sum(v) / len(v) for m, v in per.items()}


def transfer(
    source_run: str | Path,
    target_config: str | Path | Config,
    *,
    strategies: Sequence[str] | None = None,
    sizes: Sequence[Size] | str = (1, 5, 20, "all"),
    repeats: int = 5,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | Path | None = None,
) -> TransferResult:
    """Evaluate transfer strategies from ``source_run`` to the tasks of ``target_config``.

    Started by ``torchrun`` (or ``mtml transfer --nproc N``), the draws (``sizes × repeats``, every strategy
    on each) are spread over the ranks with :func:`~mtml.engine._distributed.map_ranks`; the result is the
    one a single process computes, every rank returns it and rank 0 writes ``out``.

    Args:
        strategies: names in :data:`~mtml.transfer._strategies.STRATEGIES` (default: all that fit the source);
            ``scratch`` is always included as the baseline.
        sizes: training examples per class (per task for regression) to draw, or ``"all"``.
        repeats: random draws per size (at least 2 for confidence intervals).
        options: keyword options per strategy, e.g. ``{"finetune_last": {"k": 2}}``.
        out: directory for ``transfer.json``, ``transfer.md`` and ``plots/transfer.png`` (none written if None).
    """
    started = time.time()
    with session():
        ready: list[_Plan] = []  # rank 0's plan, made while checking the set-up

        def prepare() -> None:
            ready.append(_prepare(source_run, target_config, strategies, sizes, repeats, options, out))

        if is_distributed():  # a bad set-up fails on rank 0 first and is reported once, by every rank at once
            broadcast_from_main(prepare, "checking the transfer set-up")
        if not ready:
            prepare()
        plan = ready[0]
        if plan.target.threads:  # as `mtml train` does: tiny models run fastest on one intra-op thread
            torch.set_num_threads(plan.target.threads)
        result = TransferResult(str(source_run), plan.target.name, plan.sizes, list(plan.chosen), repeats, seed, {})
        for task in plan.probe:
            result.higher_is_better.setdefault(task.primary_metric,
                                               task.metrics[task.primary_metric].higher_is_better)
        runs, sizes_n = _grid(plan, repeats, seed)
        _summarise(result, runs, sizes_n)
        result.seconds = round(time.time() - started, 2)
        if out is not None and is_main():
            write_outputs(result, Path(out))
    return result


def check_output_dir(out: str | Path | None) -> None:
    """:class:`RunExistsError` if ``out`` exists and is not an empty directory (results are never overwritten)."""
    if out is not None and not is_free_dir(out):
        raise RunExistsError(f"output directory {out} exists and is not empty; choose another --out.")


@dataclass
class _Plan:
    source: Source
    target: Config
    sizes: list[Size]
    chosen: dict[str, Strategy]
    fixed: list[Task] | None  # the target's tasks (a dataset), or None for a task family (episodes)
    probe: list[Task]


def _prepare(source_run: str | Path, target_config: str | Path | Config, strategies: Sequence[str] | None,
             sizes: Sequence[Size] | str, repeats: int, options: Mapping[str, Mapping[str, Any]] | None,
             out: str | Path | None) -> _Plan:
    """Check the arguments and load what every draw needs; every problem is raised before any work."""
    parsed = parse_sizes(sizes)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1. Got {repeats!r}.")
    for name in strategies or []:
        STRATEGIES.get(name)  # unknown names: the nearest valid one, before any work
    check_output_dir(out)
    source, _ = load_source(source_run)
    target = target_config if isinstance(target_config, Config) else load_config(target_config)
    chosen = _choose(strategies, source, options)
    if target.is_meta and "all" in parsed:
        raise ConfigError(f"target '{target.data.dataset}' is a task family (episodes of a few shots); size "
                          "'all' has no meaning there, use numbers of shots such as 1,5,20.")
    fixed = None if target.is_meta else target_tasks(target)
    probe = fixed or _episode_tasks(task_family(target, shots=int(parsed[0])), torch.Generator().manual_seed(0))
    if strategies is None:  # the default set: every strategy that serves this source and these targets
        chosen = {n: s for n, s in chosen.items() if n == "scratch" or all(s.refusal(source, t) is None for t in probe)}
    _check(source, probe, chosen)
    return _Plan(source, target, parsed, chosen, fixed, probe)


def _choose(names: Sequence[str] | None, source: Source,
            options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Strategy]:
    """``scratch`` first, then ``names`` (default: every strategy that fits the source), built with options."""
    if names is None:  # every strategy the source can serve
        hierarchical = isinstance(source.model, HierarchicalModel)
        blocks = len(trunk_blocks(source.model.trunk))  # an empty trunk (a linear model) has no last block to tune
        names = [n for n in STRATEGIES.names() if (n != "meta_adapt" or source.algorithm is not None)
                 and (n != "blup" or hierarchical) and (n != "finetune_last" or blocks > 0)]
    ordered = ["scratch", *[n for n in dict.fromkeys(names) if n != "scratch"]]
    opts = dict(options or {})
    chosen = {n: STRATEGIES.create(n, where=f"strategy '{n}'", **dict(opts.pop(n, {}))) for n in ordered}
    if opts:
        raise ConfigError(f"options given for strategies not run: {', '.join(opts)}; add them to the strategies.")
    return chosen


def _grid(plan: _Plan, repeats: int, seed: int) -> tuple[dict[tuple[str, str, str], list[float]],
                                                      dict[str, list[float]]]:
    """Every strategy on the same draws: ``{(metric, strategy, size): [per repeat]}`` and realised sizes.

    One job per draw (size, repeat), which runs every strategy on it; jobs are spread over the ranks of a
    process group and gathered in order, so the result does not depend on the number of ranks."""
    families = ({} if plan.fixed is not None else
                {si: task_family(plan.target, shots=int(size)) for si, size in enumerate(plan.sizes)})

    def draw(job: tuple[int, int]) -> tuple[float, dict[str, dict[str, float]]]:
        si, r = job
        key = seed * 100003 + si * 1009 + r
        g = torch.Generator().manual_seed(key)
        size = plan.sizes[si]
        tasks = ([subsample(t, size, g) for t in plan.fixed] if plan.fixed is not None
                 else _episode_tasks(families[si], g))
        n_train = sum(len(t.train) for t in tasks) / len(tasks)
        return n_train, {name: _score(strategy, plan.source, tasks, key) for name, strategy in plan.chosen.items()}

    jobs = [(si, r) for si in range(len(plan.sizes)) for r in range(repeats)]
    runs: dict[tuple[str, str, str], list[float]] = {}
    sizes_n: dict[str, list[float]] = {}
    for (si, _), (n_train, scores) in zip(jobs, map_ranks(draw, jobs), strict=True):
        size = str(plan.sizes[si])
        sizes_n.setdefault(size, []).append(n_train)
        for name, by_metric in scores.items():
            for metric, value in by_metric.items():
                runs.setdefault((metric, name, size), []).append(value)
    return runs, sizes_n


def _summarise(result: TransferResult, runs: dict[tuple[str, str, str], list[float]],
               sizes_n: dict[str, list[float]]) -> None:
    t = t_critical(result.repeats - 1)
    for (metric, name, size), values in runs.items():
        mean, ci = mean_ci(torch.tensor(values, dtype=torch.float64), z=t)
        n_train = sum(sizes_n[size]) / len(sizes_n[size])
        result.scores.setdefault(metric, {}).setdefault(name, {})[size] = {
            "mean": mean, "ci95": ci, "values": values, "n_train": n_train}
        if name == "scratch":
            continue
        sign = 1.0 if result.higher_is_better[metric] else -1.0
        diff = sign * (torch.tensor(values, dtype=torch.float64) - torch.tensor(runs[(metric, "scratch", size)],
                                                                                dtype=torch.float64))
        gmean, gci = mean_ci(diff, z=t)
        result.gains.setdefault(metric, {}).setdefault(name, {})[size] = {
            "mean": gmean, "ci95": gci, "verdict": _verdict(gmean, gci)}


def write_outputs(result: TransferResult, out: Path) -> None:
    """``transfer.json``, ``transfer.md`` (the tables) and ``plots/transfer.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "transfer.json", result.to_json())
    atomic_write_text(out / "transfer.md", transfer_markdown(result))
    plot_transfer(result, out / "plots" / "transfer.png")
