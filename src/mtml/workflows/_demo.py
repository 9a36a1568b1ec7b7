"""``mtml demo``: multi-task vs single-task models on penguins and schools, with the same training budget."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from mtml._yaml import load_yaml
from mtml.config import Config
from mtml.engine import TrainResult
from mtml.report import RichProgress, comparison_table
from mtml.workflows._train import train

__all__ = ["compare", "embedded_config", "run_demo"]


def embedded_config(name: str) -> Config:
    """A config shipped inside the package (``mtml/configs/<name>.yaml``)."""
    text = resources.files("mtml").joinpath("configs", f"{name}.yaml").read_text()
    return Config.from_dict(load_yaml(text, f"mtml/configs/{name}.yaml"), source=f"mtml/configs/{name}.yaml")


def compare(config: Config, out: Path, console: Console | None = None) -> tuple[TrainResult, TrainResult]:
    """Train ``config`` twice — shared trunk (multi-task) and one trunk per task (single-task) — into
    ``out/multitask`` and ``out/singletask``. The single-task models are early-stopped each on its own
    validation loss (``training.stop_per_task``), as if trained one at a time."""
    results = []
    for label, share in (("multitask", True), ("singletask", False)):
        cfg = config.model_copy(deep=True)
        cfg.model.share_trunk = share
        cfg.training.stop_per_task = not share
        cfg.name = f"{config.name}-{label}"
        progress = RichProgress(f"{config.name} {label}", console=console) if console else None
        results.append(train(cfg, out / label, progress=progress)[1])
    return results[0], results[1]


def _rows(mt: TrainResult, st: TrainResult) -> list[tuple[str, str, float, float, bool]]:
    rows: list[tuple[str, str, float, float, bool]] = []
    for task in mt.test:
        for metric in ("accuracy", "macro_f1", "mse", "r2"):
            if metric in mt.test[task]:
                rows.append((task, metric, mt.test[task][metric], st.test[task][metric], metric in ("accuracy",
                             "macro_f1", "r2")))
    return rows


def _many_task_rows(mt: TrainResult, st: TrainResult) -> list[tuple[str, str, float, float, bool]]:
    n = len(mt.test)
    mean = {k: {m: sum(r.test[t][m] for t in r.test) / n for m in ("mse", "r2")} for k, r in (("mt", mt), ("st", st))}
    wins = sum(mt.test[t]["mse"] < st.test[t]["mse"] for t in mt.test)
    return [(f"mean of {n} schools", "mse", mean["mt"]["mse"], mean["st"]["mse"], False),
            (f"mean of {n} schools", "r2", mean["mt"]["r2"], mean["st"]["r2"], True),
            ("schools won (mse)", "count", float(wins), float(n - wins), True)]


def run_demo(out: Path | None = None, *, quick: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run the tour into ``out`` (default ``runs/demo-<time>``) and print one comparison table per dataset."""
    console = console or Console()
    out = Path(out) if out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    tables = {}
    for name in ("penguins", "schools"):
        cfg = embedded_config(name)
        if quick:
            cfg.training.max_steps = min(cfg.training.max_steps, 100)
        console.rule(f"[bold]{name}[/]: shared trunk (multi-task) vs one model per task (single-task)")
        mt, st = compare(cfg, out / name, console)
        rows = _many_task_rows(mt, st) if len(mt.test) > 10 else _rows(mt, st)
        tables[name] = rows
        console.print(comparison_table(rows, title=f"{name}: held-out test metrics, same budget "
                                       f"({cfg.training.max_steps} steps max, early stopping)",
                                       labels=("multi-task", "single-task")))
    console.print(f"finished in {time.perf_counter() - t0:.0f} s. Runs (config, metrics.jsonl, checkpoints, "
                  f"plots/learning_curves.png) are in [bold]{out}[/]")
    return tables
