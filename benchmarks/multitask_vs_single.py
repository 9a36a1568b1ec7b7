"""Multi-task (shared trunk) vs single-task (one trunk per task) models, same budget, several seeds.

Usage:  .venv/bin/python benchmarks/multitask_vs_single.py [--datasets penguins schools] [--seeds 0 1 2]

Trains each shipped config (src/mtml/configs/<dataset>.yaml) twice per seed — model.share_trunk true and false,
everything else equal — and prints a Markdown table of held-out test metrics (mean ± sd over seeds). Runs go to a
temporary directory. This regenerates the table in docs/multitask.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtml.demo import compare, embedded_config
from mtml.engine import TrainResult

METRICS = (("accuracy", True), ("macro_f1", True), ("mse", False), ("r2", True))


def _value(result: TrainResult, task: str, metric: str) -> float | None:
    """A test metric of one task, or its mean over all tasks for ``task == "mean over tasks"``."""
    if task != "mean over tasks":
        return result.test[task].get(metric)
    values = [m[metric] for m in result.test.values() if metric in m]
    return statistics.mean(values) if values else None


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["penguins", "schools"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="mtml-mt-vs-st-"))
    print("| dataset | task | metric | multi-task | single-task | better |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        rows: dict[tuple[str, str], tuple[list[float], list[float], bool]] = {}
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
        for (task, metric), (a, b, higher) in rows.items():
            ma, mb = statistics.mean(a), statistics.mean(b)
            better = "tie" if ma == mb else ("multi-task" if (ma > mb) == higher else "single-task")
            print(f"| {name} | {task} | {metric} | {_cell(a)} | {_cell(b)} | {better} |", flush=True)
        print(f"<!-- {name}: {len(args.seeds)} seeds in {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
