"""Learning curves from a run's ``metrics.jsonl``, saved as PNG.

Figures are :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas: no pyplot state, so importing
or plotting never switches the backend of a notebook or of the user's own plots.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from mtml.atomic import atomic_write_bytes

__all__ = ["new_figure", "plot_learning_curves", "save_figure"]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (outside pyplot: nothing global is touched)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out ``fig`` and write it as PNG to ``path`` atomically (a crash leaves the old file or none)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _curves(records: Iterable[dict[str, Any]]) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Per-task train-loss and validation-loss curves; later records for a step win (resumed runs)."""
    train: dict[str, dict[int, float]] = {}
    val: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("kind") == "train":
            for task, loss in (r.get("task_losses") or {}).items():
                train.setdefault(task, {})[r["step"]] = loss
        elif r.get("kind") == "val":
            for task, m in (r.get("tasks") or {}).items():
                if "loss" in m:
                    val.setdefault(task, {})[r["step"]] = m["loss"]
    return train, val


def plot_learning_curves(records: Iterable[dict[str, Any]], out_dir: str | Path, *, max_panels: int = 12) -> list[Path]:
    """Write ``learning_curves.png`` (one panel per task, or an overlay with the mean when there are more than
    ``max_panels`` tasks). Returns the written paths."""
    records = list(records)
    train, val = _curves(records)
    best = next((r.get("best_step") for r in reversed(records) if r.get("kind") == "done"), None)
    tasks = list(dict.fromkeys([*train, *val]))
    if not tasks:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "learning_curves.png"
    if len(tasks) <= max_panels:
        cols = min(3, len(tasks))
        rows = -(-len(tasks) // cols)
        fig = new_figure((4.2 * cols, 3.2 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, task in zip(axes.flat, tasks, strict=False):
            _panel(ax, task, train.get(task, {}), val.get(task, {}))
            _mark_best(ax, best)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
    else:
        fig = new_figure((7, 4.5))
        ax = fig.subplots()
        # one artist for all per-task curves: thousands of separate lines take seconds to draw and to place a
        # legend around
        curves = [list(val[t].items()) for t in tasks if val.get(t)]
        ax.add_collection(LineCollection(curves, colors="tab:blue", alpha=0.12, linewidths=0.8))
        steps = sorted({s for c in val.values() for s in c})
        mean = [sum(val[t][s] for t in val if s in val[t]) / sum(1 for t in val if s in val[t]) for s in steps]
        ax.plot(steps, mean, color="black", lw=2, label=f"mean of {len(val)} tasks")
        ax.set(title="validation loss per task", xlabel="step", ylabel="loss")
        _mark_best(ax, best, loc="upper right")
        ax.autoscale_view()
    save_figure(fig, path)
    return [path]


def _panel(ax: Any, task: str, train: dict[int, float], val: dict[int, float]) -> None:
    if train:
        ax.plot(list(train), list(train.values()), label="train", color="tab:blue", alpha=0.7)
    if val:
        ax.plot(list(val), list(val.values()), label="val", color="tab:orange", marker="o", ms=3)
    ax.set(title=task, xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)


def _mark_best(ax: Any, best: int | None, *, loc: str = "best") -> None:
    if best:
        ax.axvline(best, color="grey", ls="--", lw=1, label=f"best step {best}")
    ax.legend(fontsize=8, loc=loc)
