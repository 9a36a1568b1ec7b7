"""``mtml adapt``: unsupervised domain adaptation of a trained run to the shifted domain of a target config.

The source run gives the model and, through its own ``config.yaml``, the labelled source rows (the train split of
the task with the target task's name). The target config gives, per task, unlabelled rows (its ``train`` split,
whose labels the adaptation methods never read) and a labelled ``test`` split. Every method of
:data:`~mtml.transfer._adaptation.ADAPTERS` is fitted once per seed and scored by test accuracy (the mean over the
target tasks), next to two references: ``source_only`` (the source model as is) and ``target_supervised`` (the
same start fine-tuned on the target train rows *with* their labels: an upper bound, not a method).

A method's gain over source-only is paired per seed (source-only is deterministic, so the pairing removes
nothing but keeps the sign convention); its 95% interval is Student's t over the seeds. The interval covers the
adaptation's randomness (batches, discriminator initialisation) for this one source run, not retraining the source.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtml.atomic import atomic_write_text
from mtml.config import Config, load_config
from mtml.errors import ConfigError
from mtml.groups import labelled_only
from mtml.meta import mean_ci
from mtml.tasks import Task, TaskKind
from mtml.transfer import ADAPTERS, Adapter, Source, supervised_target
from mtml.workflows._build import dataset_tasks, load_source
from mtml.workflows._transfer import check_output_dir, t_critical

__all__ = ["AdaptResult", "adapt", "parse_methods"]

REFERENCES = ("source_only", "target_supervised")


@dataclass
class AdaptResult:
    """Target test accuracy per method and reference (``mean``, ``ci95``, per-seed ``values``) and each method's
    gain over ``source_only`` (``mean``, ``ci95``, ``verdict``)."""

    source: str
    target: str
    methods: list[str]
    seeds: int
    seed: int
    n_source: int
    n_target_unlabelled: int
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    gains: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=True)

    def markdown(self) -> str:
        """The result as a Markdown table (accuracy ± 95% CI, gain over source-only ± 95% CI)."""
        lines = [f"Target test accuracy, {self.seeds} seeds, mean ± 95% t-interval; gain over source-only paired "
                 "per seed (✓ interval above 0, ⚠ below 0).", "", "| method | accuracy | gain over source-only |",
                 "|---|---|---|"]
        for name, s in self.scores.items():
            g = self.gains.get(name)
            gain = "—" if g is None else f"{g['mean']:+.4f} ± {g['ci95']:.4f} {_MARK.get(g['verdict'], '')}".rstrip()
            ci = "" if s["ci95"] != s["ci95"] else f" ± {s['ci95']:.4f}"  # nan: one seed, or deterministic
            lines.append(f"| {name} | {s['mean']:.4f}{ci} | {gain} |")
        return "\n".join(lines) + "\n"


_MARK = {"gain": "✓", "loss": "⚠"}


def parse_methods(methods: Sequence[str] | str | None) -> list[str]:
    """Method names from a list or ``"dann,cdan"`` (default: every registered method), each checked."""
    if methods is None:
        return ADAPTERS.names()
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = list(dict.fromkeys(str(m).strip() for m in items if str(m).strip()))
    if not names:
        raise ConfigError(f"methods: give at least one of {', '.join(ADAPTERS.names())}.")
    for name in names:
        ADAPTERS.get(name)  # unknown names: the nearest valid one
    return names


def _pairs(source: Source, source_config: Config, target: Config) -> list[tuple[Task, Task]]:
    """(labelled source task, target task) by task name, every problem raised before any training."""
    if target.is_meta:
        raise ConfigError(f"target '{target.data.dataset}' is a task family (episodes); domain adaptation needs a "
                          "joint dataset whose train rows are the unlabelled target rows.")
    if source_config.is_meta:
        raise ConfigError("domain adaptation needs a jointly trained source run (its labelled rows are the source "
                          "domain); this run was meta-learned.")
    sources = {t.name: t for t in dataset_tasks(source_config)}
    pairs = []
    for task in dataset_tasks(target):
        if task.name not in sources:
            raise ConfigError(f"target task '{task.name}' is not a task of the source run (tasks: "
                              f"{', '.join(sources)}); domain adaptation keeps the task and changes the domain.")
        if task.kind is not TaskKind.MULTICLASS:
            raise ConfigError(f"target task '{task.name}' is {task.kind.value}; domain adaptation here handles "
                              "multiclass tasks only.")
        if len(task.train) == 0:
            raise ConfigError(f"target task '{task.name}' has no unlabelled rows (its train split is empty); give "
                              "the target config train rows to adapt to (their labels are not read).")
        if task.test is None or task.test.labelled == 0:
            raise ConfigError(f"target task '{task.name}' has no labelled test split to score the adaptation on.")
        if task.input_shape != sources[task.name].input_shape:
            raise ConfigError(f"target task '{task.name}' has inputs of shape {task.input_shape} but the source "
                              f"takes {sources[task.name].input_shape}; use the same image size and flattening.")
        pairs.append((labelled_only(sources[task.name]), task))
    return pairs


def _accuracy(predictor: nn.Module, task: Task) -> float:
    test = labelled_only(task).test
    assert test is not None
    with torch.no_grad():
        return float((predictor(test.x).argmax(1) == test.y).double().mean())


def adapt(
    source_run: str | Path,
    target_config: str | Path | Config,
    *,
    methods: Sequence[str] | str | None = None,
    seeds: int = 3,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    upper_bound: bool = True,
    out: str | Path | None = None,
) -> AdaptResult:
    """Adapt ``source_run`` to the domain of ``target_config`` with each method, ``seeds`` times.

    Args:
        methods: names in :data:`~mtml.transfer._adaptation.ADAPTERS` (default: all), or ``"dann,mcc"``.
        seeds: adaptation seeds per method (at least 2 for intervals).
        options: keyword options per method, e.g. ``{"mcc": {"temperature": 2.0}}``.
        upper_bound: also fit ``target_supervised`` (reads the target train labels).
        out: directory for ``adapt.json`` and ``adapt.md`` (nothing written if None).
    """
    started = time.time()
    names = parse_methods(methods)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be an integer >= 1. Got {seeds!r}.")
    opts = dict(options or {})
    chosen: dict[str, Adapter] = {n: ADAPTERS.create(n, where=f"method '{n}'", **dict(opts.pop(n, {}))) for n in names}
    if opts:
        raise ConfigError(f"options given for methods not run: {', '.join(opts)}; add them to the methods.")
    check_output_dir(out)
    source, source_config = load_source(source_run)
    target = target_config if isinstance(target_config, Config) else load_config(target_config)
    pairs = _pairs(source, source_config, target)
    if target.threads:
        torch.set_num_threads(target.threads)
    runs: dict[str, list[float]] = {}

    def score(fit: Any) -> float:
        return sum(_accuracy(fit(i, src, tgt), tgt) for i, (src, tgt) in enumerate(pairs)) / len(pairs)

    base = score(lambda i, src, tgt: nn.Sequential(source.model.trunk, source.model.heads[tgt.name]).eval())
    runs["source_only"] = [base] * seeds
    for r in range(seeds):
        key = seed * 100003 + r

        def gen(i: int, key: int = key) -> torch.Generator:
            return torch.Generator().manual_seed(key * 7919 + i)

        for name, method in chosen.items():
            runs.setdefault(name, []).append(score(
                lambda i, src, tgt, m=method: m.fit(source, tgt, src.train, tgt.train.x, generator=gen(i))))
        if upper_bound:
            runs.setdefault("target_supervised", []).append(score(
                lambda i, src, tgt: supervised_target(source, tgt, generator=gen(i))))
    result = AdaptResult(str(source_run), target.name, names, seeds, seed,
                         sum(len(s.train) for s, _ in pairs), sum(len(t.train) for _, t in pairs))
    tq = t_critical(seeds - 1)
    for name in ["source_only", *names, *(["target_supervised"] if upper_bound else [])]:
        values = torch.tensor(runs[name], dtype=torch.float64)
        mean, ci = mean_ci(values, z=tq)
        result.scores[name] = {"mean": mean, "ci95": float("nan") if name == "source_only" else ci,
                               "values": runs[name]}
        if name == "source_only":
            continue
        gmean, gci = mean_ci(values - base, z=tq)
        verdict = ("one seed: no interval" if gci != gci else "gain" if gmean - gci > 0 else
                   "loss" if gmean + gci < 0 else "no clear difference")
        result.gains[name] = {"mean": gmean, "ci95": gci, "verdict": verdict}
    result.seconds = round(time.time() - started, 2)
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "adapt.json", result.to_json())
        atomic_write_text(path / "adapt.md", result.markdown())
    return result
