"""Multi-task (shared trunk) vs single-task (one trunk per task) models, same budget, several seeds; on datasets of
many tasks of one kind also a pooled model and a classical mixed model.

Usage:  .venv/bin/python benchmarks/multitask_vs_single.py [--datasets penguins schools] [--seeds 0 1 2]
                                                            [--re-slope INDEX|none]

Trains each shipped config (src/mtml/configs/<dataset>.yaml) twice per seed — model.share_trunk true and false,
everything else equal; the single-task models are early-stopped each on its own validation loss
(training.stop_per_task) — and prints a Markdown table of held-out test metrics (mean ± sd over seeds). Runs go to
a temporary directory. This regenerates the table in docs/multitask.md.

Datasets whose tasks are of one kind on rows of their own (schools) get a second table, one row per model:

* pooled: ONE model for all tasks (every task's rows concatenated into one task per split), trained with the same
  config, then scored on each task's own test rows;
* mixed model (needs ``pip install 'mtml[stats]'``; skipped with one line otherwise; 1-output regressions only):
  statsmodels MixedLM on the same rows and scaling, fixed effects on every input feature, a random intercept per
  task and a random slope on feature ``--re-slope`` (default: SES for schools, none elsewhere), REML on the train
  rows; a task's prediction is the fixed part plus its predicted random effects.

Each row gives the mean per-task test MSE and R² (mean ± sd over seeds) and the paired per-task MSE difference
to the multi-task model (each task's difference averaged over seeds; mean and 95% CI over tasks, mean ± 1.96·sd/√m)
with how many tasks each of the two wins on that averaged difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtml.config import Config
from mtml.engine import StopRule, TrainResult, train_multitask
from mtml.engine._joint import predict
from mtml.errors import ConfigError
from mtml.nn import ARCHITECTURES
from mtml.tasks import Split, Task, TaskKind
from mtml.workflows import build, compare, embedded_config, resolve_device

METRICS = (("accuracy", True), ("macro_f1", True), ("mse", False), ("r2", True))
#: the feature given a random slope by default (schools: pupils' SES, see mtml.datasets._schools)
DEFAULT_SLOPE = {"schools": 2}
Scores = dict[str, dict[str, float]]


# -- pooled: one model for every task's rows ------------------------------------------------------------------
def not_poolable(tasks: Sequence[Task]) -> str | None:
    """Why ``tasks`` cannot be pooled into one task, or None when they can."""
    if len({(t.kind, t.input_shape) for t in tasks}) != 1:
        return "its tasks differ in kind or input shape"
    if any(t.group is not None for t in tasks):
        return "its tasks share rows"
    if any(t.val is None or t.test is None for t in tasks):
        return "a task lacks a val or test split"
    return None


def pooled_task(tasks: Sequence[Task], name: str = "pooled") -> Task:
    """One task holding every task's rows, split by split (the first task's loss and metrics)."""
    reason = not_poolable(tasks)
    if reason:
        raise ConfigError(f"cannot pool these tasks into one: {reason}; pool tasks of one kind on their own rows.")

    def cat(split: str) -> Split:
        parts = [t.split(split) for t in tasks]
        masks = None if all(p.mask is None for p in parts) else torch.cat(
            [torch.ones(len(p), dtype=torch.bool) if p.mask is None else p.mask for p in parts])
        return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), masks)

    first = tasks[0]
    return Task(name, first.kind, cat("train"), cat("val"), cat("test"), num_outputs=max(t.num_outputs for t in tasks),
                loss=first.loss, metrics=first.metrics)


def train_pooled(config: Config, tasks: Sequence[Task]) -> Scores:
    """Train one model of ``config`` on the pooled rows of ``tasks``; test metrics on each task's own rows."""
    pooled = pooled_task(tasks)
    m, t = config.model, config.training
    extra: dict[str, Any] = {}
    if m.architecture == "hps":
        extra = {"backbone": m.backbone, "backbone_options": m.backbone_options}
    torch.manual_seed(config.seed)
    model = ARCHITECTURES.create(m.architecture, [pooled], where="model.options", trunk_hidden=m.trunk_hidden,
                                 head_hidden=m.head_hidden, stem_width=m.stem_width, activation=m.activation,
                                 dropout=m.dropout, **extra, **m.options)
    device = resolve_device(config.device)
    train_multitask(model, [pooled], weighting=t.weighting.name, weighting_options=t.weighting.options,
                    optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size,
                    stop=StopRule(max_steps=t.max_steps, eval_every=t.eval_every, patience=t.patience,
                                  min_delta=t.min_delta), seed=config.seed, device=device)
    model.eval()
    scores: Scores = {}
    for task in tasks:
        s = task.split("test")
        scores[task.name] = task.compute_metrics(predict(model, pooled.name, s.x.to(device)).cpu(), s.y, s.mask)
    return scores


# -- mixed model: random intercept (and slope) per task ---------------------------------------------------------
def not_mixable(tasks: Sequence[Task]) -> str | None:
    """Why the mixed model does not apply to ``tasks``, or None when it does."""
    if not all(t.kind is TaskKind.REGRESSION and t.num_outputs == 1 and len(t.input_shape) == 1 for t in tasks):
        return "it needs 1-output regression tasks with flat inputs"
    return not_poolable(tasks)


@dataclass
class MixedModelFit:
    """A fitted MixedLM: ``fixed`` = [intercept, one coefficient per feature]; ``random[task]`` = [intercept] or
    [intercept, slope on feature ``slope``]."""

    fixed: np.ndarray
    random: dict[str, np.ndarray]
    slope: int | None
    converged: bool

    def predict(self, task: str, x: np.ndarray) -> np.ndarray:
        b = self.random[task]
        pred = self.fixed[0] + x @ self.fixed[1:] + b[0]
        return pred + b[1] * x[:, self.slope] if self.slope is not None else pred

    def scores(self, tasks: Sequence[Task]) -> Scores:
        out: Scores = {}
        for t in tasks:
            s = t.split("test")
            pred = torch.from_numpy(self.predict(t.name, s.x.double().numpy())).float()[:, None]
            out[t.name] = t.compute_metrics(pred, s.y, s.mask)
        return out


def fit_mixed_model(tasks: Sequence[Task], *, slope: int | None = None) -> MixedModelFit:
    """REML fit of ``y = x·β + b₀[task] + b₁[task]·x[slope] + ε`` on the labelled train rows of ``tasks``."""
    from statsmodels.regression.mixed_linear_model import MixedLM
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    reason = not_mixable(tasks)
    if reason:
        raise ConfigError(f"the mixed model does not apply: {reason}.")
    width = tasks[0].input_shape[0]
    if slope is not None and not 0 <= slope < width:
        raise ConfigError(f"--re-slope {slope}: the tasks have {width} features; give an index in 0..{width - 1} "
                          "or none.")
    xs, ys, groups = [], [], []
    for i, t in enumerate(tasks):
        keep = slice(None) if t.train.mask is None else t.train.mask
        xs.append(t.train.x[keep].double().numpy())
        ys.append(t.train.y[keep].double().numpy()[:, 0])
        groups.append(np.full(len(ys[-1]), i))
    x, y, g = np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)
    ones = np.ones((len(y), 1))
    z = ones if slope is None else np.column_stack([ones, x[:, slope]])
    with warnings.catch_warnings():  # (boundary fits: a random-slope variance near 0 is a result, not an error)
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = MixedLM(y, np.column_stack([ones, x]), groups=g, exog_re=z).fit(reml=True)
    random = {t.name: np.asarray(result.random_effects[i], dtype=np.float64) for i, t in enumerate(tasks)}
    return MixedModelFit(np.asarray(result.fe_params, dtype=np.float64), random, slope, bool(result.converged))


# -- tables ----------------------------------------------------------------------------------------------------
def paired_difference(model: Mapping[str, float], reference: Mapping[str, float]) -> tuple[float, float, int, int]:
    """Over tasks, ``model − reference``: (mean, 95% CI half-width 1.96·sd/√m, tasks model wins, reference wins)."""
    d = [model[t] - reference[t] for t in reference]
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.mean(d), half, sum(x < 0 for x in d), sum(x > 0 for x in d)


def _value(result: TrainResult, task: str, metric: str) -> float | None:
    """A test metric of one task, or its mean over all tasks for ``task == "mean over tasks"``."""
    if task != "mean over tasks":
        return result.test[task].get(metric)
    values = [m[metric] for m in result.test.values() if metric in m]
    return statistics.mean(values) if values else None


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _baseline_rows(name: str, runs: dict[str, list[Scores]]) -> list[str]:
    """Table rows of every model in ``runs`` (label → per-seed test scores), paired against the multi-task one."""
    def seed_mean(scores: list[Scores], task: str) -> float:
        return statistics.mean(s[task]["mse"] for s in scores)

    reference = {t: seed_mean(runs["multi-task"], t) for t in runs["multi-task"][0]}
    lines = []
    for label, scores in runs.items():
        mse = [statistics.mean(s[t]["mse"] for t in s) for s in scores]
        r2 = [statistics.mean(s[t]["r2"] for t in s) for s in scores]
        diff, wins = "—", "—"
        if label != "multi-task":
            mean, half, won, lost = paired_difference({t: seed_mean(scores, t) for t in reference}, reference)
            diff, wins = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]", f"{won} / {lost}"
        lines.append(f"| {name} | {label} | {_cell(mse)} | {_cell(r2)} | {diff} | {wins} |")
    return lines


def _slope_for(name: str, given: str) -> int | None:
    if given == "auto":
        return DEFAULT_SLOPE.get(name)
    return None if given == "none" else int(given)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["penguins", "schools"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--re-slope", default="auto", metavar="INDEX|none",
                    help="feature index with a random slope in the mixed model (default: SES for schools, else none)")
    args = ap.parse_args()
    if args.re_slope not in ("auto", "none") and not args.re_slope.isdigit():
        ap.error(f"--re-slope: expected a feature index or none, got {args.re_slope!r}")
    torch.set_num_threads(1)
    have_stats = importlib.util.find_spec("statsmodels") is not None
    out = Path(tempfile.mkdtemp(prefix="mtml-mt-vs-st-"))
    print("| dataset | task | metric | multi-task | single-task | better |")
    print("|---|---|---|---|---|---|")
    baselines: list[str] = []
    for name in args.datasets:
        rows: dict[tuple[str, str], tuple[list[float], list[float], bool]] = {}
        runs: dict[str, list[Scores]] = {}
        notes: list[str] = []
        t0 = time.perf_counter()
        for seed in args.seeds:
            cfg = embedded_config(name)
            cfg.seed = seed
            mt, st = compare(cfg, out / f"{name}-{seed}")
            many = len(mt.test) > 10
            for task in ["mean over tasks"] if many else list(mt.test):
                for metric, higher in METRICS:
                    a, b = _value(mt, task, metric), _value(st, task, metric)
                    if a is None or b is None:
                        continue
                    entry = rows.setdefault((task, metric), ([], [], higher))
                    entry[0].append(a)
                    entry[1].append(b)
            if many:
                wins = sum(mt.test[t]["mse"] < st.test[t]["mse"] for t in mt.test)
                rows.setdefault(("tasks won by multi-task (mse)", "count"), ([], [], True))[0].append(wins)
                rows[("tasks won by multi-task (mse)", "count")][1].append(len(mt.test) - wins)
            tasks = build(cfg).tasks  # the very rows and scaling of the two runs above
            if not_poolable(tasks) is not None or any("mse" not in m for m in mt.test.values()):
                continue
            runs.setdefault("multi-task", []).append(mt.test)
            runs.setdefault("single-task (per-task stopping)", []).append(st.test)
            runs.setdefault("pooled", []).append(train_pooled(cfg, tasks))
            if have_stats and not_mixable(tasks) is None:
                fitted = fit_mixed_model(tasks, slope=_slope_for(name, args.re_slope))
                runs.setdefault("mixed model", []).append(fitted.scores(tasks))
                if not fitted.converged:
                    notes.append(f"seed {seed}: MixedLM did not converge")
        for (task, metric), (a, b, higher) in rows.items():
            ma, mb = statistics.mean(a), statistics.mean(b)
            better = "tie" if ma == mb else ("multi-task" if (ma > mb) == higher else "single-task")
            print(f"| {name} | {task} | {metric} | {_cell(a)} | {_cell(b)} | {better} |", flush=True)
        print(f"<!-- {name}: {len(args.seeds)} seeds in {time.perf_counter() - t0:.0f} s -->", flush=True)
        if runs:
            baselines += _baseline_rows(name, runs)
        if "mixed model" in runs:
            slope = _slope_for(name, args.re_slope)
            baselines.append(f"<!-- {name} mixed model: random intercept"
                             f"{'' if slope is None else f' and slope on feature {slope}'}"
                             f"{'; ' + '; '.join(notes) if notes else ''} -->")
    if baselines:
        print()
        print("| dataset | model | mean task test mse | mean task test r2 | Δ mse vs multi-task, mean [95% CI over "
              "tasks] | tasks won (model / multi-task) |")
        print("|---|---|---|---|---|---|")
        print("\n".join(baselines))
        if not have_stats:
            print("<!-- mixed model skipped: statsmodels is not installed (pip install 'mtml[stats]') -->")


if __name__ == "__main__":
    main()
