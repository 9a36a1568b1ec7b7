"""Quality of every weighting on real data: held-out test metrics per task and Δm against single-task models.

Usage:  .venv/bin/python benchmarks/weighting_quality.py [--datasets penguins movies schools] [--seeds 0 1 2]
                                                         [--weightings equal mgda ...] [--max-steps N]

For each dataset's shipped config (src/mtml/configs/<dataset>.yaml) and seed, trains the single-task baseline
(``model.share_trunk: false``, equal weights) once, then the shared-trunk model with each weighting (its
default options; ``training.weighting`` is the only change). Same budget, stopping rule and data split.

Δm (lower is better) is the mean relative change over every (task, metric) pair, sign-flipped for metrics where
higher is better:  Δm = 100% · mean_k (−1)^{higher_k} (M_k − B_k) / |B_k|, with B the single-task value of the
same seed (Maninis et al. 2019; the convention of Nash-MTL and LibMTL). The ``loss`` metric is left out, and for
schools only ``mse`` is used (per-school R² on ~11 test pupils has near-zero denominators). Prints Markdown tables
(mean ± sd over seeds); ``--json`` writes the raw results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtml.weighting import WEIGHTINGS
from mtml.workflows import build, embedded_config, train

METRICS = {"schools": ["mse"]}


def _cell(values: list[float], digits: int = 4) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def delta_m(test: dict[str, dict[str, float]], base: dict[str, dict[str, float]], higher: dict[str, dict[str, bool]],
            metrics: list[str] | None) -> float:
    """Δm in percent (lower is better) of ``test`` against ``base`` over every (task, metric) pair."""
    terms = []
    for task, values in base.items():
        for name, b in values.items():
            if name == "loss" or (metrics and name not in metrics) or abs(b) < 1e-12:
                continue
            sign = -1.0 if higher[task][name] else 1.0
            terms.append(sign * (test[task][name] - b) / abs(b))
    return 100.0 * statistics.mean(terms)


def run(dataset: str, seeds: list[int], weightings: list[str], out: Path, max_steps: int | None) -> dict[str, Any]:
    results: dict[str, Any] = {"single": {}, "runs": {w: {} for w in weightings}, "seconds": {}}
    higher: dict[str, dict[str, bool]] = {}
    for seed in seeds:
        cfg = embedded_config(dataset)
        cfg.seed = seed
        if max_steps:
            cfg.training.max_steps = max_steps
        if not higher:
            higher = {t.name: {k: m.higher_is_better for k, m in t.metrics.items()} for t in build(cfg).tasks}
        single = cfg.model_copy(deep=True)
        single.model.share_trunk = False
        single.training.weighting.name, single.training.weighting.options = "equal", {}
        results["single"][seed] = train(single, out / f"{dataset}-{seed}-single")[1].test
        for name in weightings:
            c = cfg.model_copy(deep=True)
            c.training.weighting.name, c.training.weighting.options = name, {}
            t0 = time.perf_counter()
            results["runs"][name][seed] = train(c, out / f"{dataset}-{seed}-{name}")[1].test
            results["seconds"].setdefault(name, []).append(time.perf_counter() - t0)
        print(f"# {dataset} seed {seed} done", flush=True)
    results["higher"] = higher
    return results


def report(dataset: str, res: dict[str, Any], seeds: list[int]) -> str:
    metrics = METRICS.get(dataset)
    single, higher = res["single"], res["higher"]
    tasks = list(next(iter(single.values())))
    few = len(tasks) <= 10
    lines = [f"\n### {dataset} ({len(tasks)} tasks, seeds {', '.join(map(str, seeds))})\n"]
    head = ["weighting", "Δm % (↓)"]
    if few:
        head += [f"{t} {next(iter(k for k in single[seeds[0]][t] if k != 'loss'))}" for t in tasks]
    else:
        head += ["mean mse", "tasks better than single-task (mse)"]
    head.append("s / run")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, runs: dict[int, Any], secs: list[float] | None) -> str:
        dm = [delta_m(runs[s], single[s], higher, metrics) for s in seeds]
        cells = [name, _cell(dm, 2)]
        if few:
            for t in tasks:
                key = next(k for k in single[seeds[0]][t] if k != "loss")
                cells.append(_cell([runs[s][t][key] for s in seeds]))
        else:
            cells.append(_cell([statistics.mean(runs[s][t]["mse"] for t in tasks) for s in seeds]))
            cells.append(_cell([float(sum(runs[s][t]["mse"] < single[s][t]["mse"] for t in tasks)) for s in seeds], 1))
        cells.append(f"{statistics.mean(secs):.0f}" if secs else "—")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("single-task", single, None))
    for name, runs in res["runs"].items():
        lines.append(row(name, runs, res["seconds"].get(name)))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["penguins", "movies", "schools"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--weightings", nargs="+", default=WEIGHTINGS.names())
    ap.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (default: config's)")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="mtml-quality-"))
    everything = {}
    for dataset in args.datasets:
        res = run(dataset, args.seeds, args.weightings, out, args.max_steps)
        everything[dataset] = res
        print(report(dataset, res, args.seeds), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
