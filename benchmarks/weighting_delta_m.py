"""Δm % of every registered weighting on Multi-Fashion (and optionally the GradNorm synthetic tasks), over seeds.

Usage:  .venv/bin/python benchmarks/weighting_delta_m.py [--datasets multi_fashion gradnorm_synthetic]
                                                         [--seeds 0 1 2] [--weightings equal mgda ...]
                                                         [--steps 500] [--markdown out.md] [--json out.json]

Every name in ``mtml.weighting.WEIGHTINGS`` is run (read at run time, so weightings added later are covered) with
its default options; one that cannot be built or trained is listed with its reason. Per seed, the single-task
baseline (``model.share_trunk: false``, each task early-stopped on its own) and every shared-trunk run use the same
data draw, model widths, optimiser, step budget and stopping rule; only ``training.weighting`` differs.

* ``multi_fashion`` (:func:`mtml.datasets.multi_fashion`, 36×36 canvas flattened to 1296 pixels): 5000 train,
  1000 val, 2000 test images; MLP trunk 1296→256→128 (ReLU), linear heads; Adam, lr 1e-3, batch 128, ``--steps``
  updates (default 500), validation every 50 with patience 3. Metric: test accuracy of ``left`` and ``right``.
* ``gradnorm_synthetic`` (Chen et al. 2018): 10 tasks, 1000 train / 300 val / 1000 test rows, trunk 250→100→100,
  same optimiser. Metric: test MSE per task.

Δm (lower is better) is :func:`mtml.metrics.delta_m` of a run's metrics against the same seed's single-task
metrics. Cells are mean ± the half-width of the 95% Student-t interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mtml.config import Config
from mtml.metrics import delta_m
from mtml.weighting import WEIGHTINGS
from mtml.workflows import train

# two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)

SETUPS: dict[str, dict[str, Any]] = {
    "multi_fashion": {"options": {"train_size": 5000, "val_size": 1000, "test_size": 2000, "flatten": True},
                      "trunk": [256, 128], "metric": "accuracy"},
    "gradnorm_synthetic": {"options": {"n_train": 1000, "n_val": 300, "n_test": 1000},
                           "trunk": [100, 100], "metric": "mse"},
}


def config_for(dataset: str, seed: int, weighting: str, steps: int, single: bool = False) -> Config:
    """The benchmark's config of one run (``single``: the single-task baseline)."""
    setup = SETUPS[dataset]
    return Config.model_validate({
        "name": f"{dataset}-{weighting}", "seed": seed, "threads": 1,
        "data": {"dataset": dataset, "options": dict(setup["options"])},
        "model": {"trunk_hidden": list(setup["trunk"]), "share_trunk": not single},
        "training": {"weighting": {"name": "equal" if single else weighting}, "optimizer": "adam", "lr": 1e-3,
                     "batch_size": 128, "max_steps": steps, "eval_every": 50, "patience": 3,
                     "stop_per_task": single},
    })


def ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T975[min(len(values) - 2, len(T975) - 1)] * statistics.stdev(values) / math.sqrt(len(values))


def cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, half = ci([scale * v for v in values])
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def run(dataset: str, seeds: list[int], weightings: list[str], steps: int, out: Path) -> dict[str, Any]:
    metric = SETUPS[dataset]["metric"]
    res: dict[str, Any] = {"single": {}, "runs": {w: {} for w in weightings}, "failed": {}, "seconds": {}}
    for seed in seeds:
        summary = train(config_for(dataset, seed, "equal", steps, single=True), out / f"{dataset}-{seed}-single")[1]
        res["single"][seed] = {t: m[metric] for t, m in summary.test.items()}
        for name in weightings:
            if name in res["failed"]:
                continue
            t0 = time.perf_counter()
            try:
                result = train(config_for(dataset, seed, name, steps), out / f"{dataset}-{seed}-{name}")[1]
            except Exception as exc:  # a method that cannot run is reported, not fatal
                first = str(exc).splitlines()[0].split("; ")[0]  # the error's first clause
                res["failed"][name] = f"{type(exc).__name__}: {first[:160]}"
                traceback.print_exc()
                continue
            res["runs"][name][seed] = {t: m[metric] for t, m in result.test.items()}
            res["seconds"].setdefault(name, []).append(time.perf_counter() - t0)
        print(f"# {dataset} seed {seed} done", flush=True)
    res["metric"], res["higher"] = metric, metric != "mse"
    return res


def table(dataset: str, res: dict[str, Any], seeds: list[int]) -> str:
    metric, higher = res["metric"], res["higher"]
    single = res["single"]
    tasks = list(single[seeds[0]])
    few = len(tasks) <= 3
    scale = 100.0 if metric == "accuracy" else 1.0
    unit = " %" if metric == "accuracy" else ""
    head = ["weighting"] + ([f"{t} {metric}{unit}" for t in tasks] if few else [f"mean {metric}"]) + ["Δm % (↓)",
                                                                                                      "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, runs: dict[int, dict[str, float]], secs: list[float] | None) -> tuple[float, str]:
        cells = [name]
        if few:
            cells += [cell([runs[s][t] for s in seeds], scale) for t in tasks]
        else:
            cells.append(cell([statistics.mean(runs[s].values()) for s in seeds], scale, 3))
        dms = [delta_m(runs[s], single[s], dict.fromkeys(tasks, higher)) for s in seeds]
        cells += [cell(dms), f"{statistics.mean(secs):.1f}" if secs else "—"]
        return statistics.mean(dms), "| " + " | ".join(cells) + " |"

    lines.append(row("single-task", single, None)[1])
    rows = [row(name, runs, res["seconds"].get(name)) for name, runs in res["runs"].items()
            if name not in res["failed"] and len(runs) == len(seeds)]
    lines += [r for _, r in sorted(rows)]
    for name, why in res["failed"].items():
        lines.append(f"| {name} | " + " | ".join(["not run"] * (len(head) - 2)) + f" | {why} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["multi_fashion"], choices=sorted(SETUPS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--weightings", nargs="+", default=None, help="default: every registered weighting")
    ap.add_argument("--steps", type=int, default=500, help="training.max_steps of every run")
    ap.add_argument("--markdown", help="also write the tables here")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    weightings = args.weightings or WEIGHTINGS.names()
    out = Path(tempfile.mkdtemp(prefix="mtml-delta-m-"))
    everything, texts = {}, []
    t0 = time.perf_counter()
    for dataset in args.datasets:
        res = run(dataset, args.seeds, weightings, args.steps, out)
        everything[dataset] = res
        text = f"### {dataset} (seeds {', '.join(map(str, args.seeds))}, {args.steps} steps)\n\n" + \
            table(dataset, res, args.seeds)
        texts.append(text)
        print(text, flush=True)
    print(f"# total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(texts) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
