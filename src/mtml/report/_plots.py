"""A run's pictures from its ``metrics.jsonl``, saved as PNG: learning curves, task weights, the
meta-validation curve with its confidence band, the learning rate.

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

__all__ = ["new_figure", "plot_learning_curves", "plot_learning_rate", "plot_meta_validation", "plot_run",
           "plot_task_weights", "save_figure"]


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


def _series(records: list[dict[str, Any]], kind: str, *path: str) -> dict[int, float]:
    """``step → value`` of the number at ``path`` in every ``kind`` record (later records win: resumed runs)."""
    out: dict[int, float] = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        node: Any = r
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int | float) and not isinstance(node, bool):
            out[int(r["step"])] = float(node)
    return dict(sorted(out.items()))


def plot_task_weights(records: Iterable[dict[str, Any]], out_dir: str | Path, *, max_lines: int = 12) -> list[Path]:
    """``task_weights.png``: each task's weight over training (joint runs; the weighting's output, logged every
    10 updates). Nothing is written when the run logged no weights."""
    records = list(records)
    names = list(dict.fromkeys(t for r in records if r.get("kind") == "train" for t in (r.get("weights") or {})))
    if not names:
        return []
    curves = {t: _series(records, "train", "weights", t) for t in names}
    fig = new_figure((7, 4.2))
    ax = fig.subplots()
    if len(names) <= max_lines:
        for t in names:
            ax.plot(list(curves[t]), list(curves[t].values()), label=t, lw=1.4)
        ax.legend(fontsize=8, ncol=2 if len(names) > 6 else 1)
    else:
        ax.add_collection(LineCollection([list(c.items()) for c in curves.values()], colors="tab:blue",
                                         alpha=0.2, linewidths=0.8))
        ax.autoscale_view()
    ax.set(title=f"task weights ({len(names)} tasks)", xlabel="step", ylabel="weight")
    path = Path(out_dir) / "task_weights.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return [path]


def plot_meta_validation(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``meta_validation.png``: the meta-training query loss and the meta-validation score at each validation
    with its 95% confidence band, per metric (loss, and accuracy for classification). Meta-learning runs only."""
    records = list(records)
    keys = next((list(r["meta_val"]) for r in records if r.get("kind") == "val" and r.get("meta_val")), [])
    means = [k for k in keys if "@" in k and not k.endswith("_ci95")]  # (not num_tasks)
    if not means:
        return []
    metrics = list(dict.fromkeys(k.split("@")[0] for k in means))
    fig = new_figure((4.6 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        train = _series(records, "train", metric)
        if train:
            ax.plot(list(train), list(train.values()), color="tab:blue", alpha=0.6, label="meta-train (query)")
        for key in (k for k in means if k.split("@")[0] == metric):
            mean = _series(records, "val", "meta_val", key)
            half = _series(records, "val", "meta_val", f"{key}_ci95")
            steps = list(mean)
            ax.plot(steps, list(mean.values()), marker="o", ms=3, color="tab:orange", label=f"meta-val {key}")
            if half:
                lo = [mean[s] - half.get(s, 0.0) for s in steps]
                hi = [mean[s] + half.get(s, 0.0) for s in steps]
                ax.fill_between(steps, lo, hi, color="tab:orange", alpha=0.25, label="95% CI")
        ax.set(title=f"meta-validation {metric}", xlabel="step", ylabel=metric)
        best = next((r.get("best_step") for r in reversed(records) if r.get("kind") == "done"), None)
        _mark_best(ax, best)
    path = Path(out_dir) / "meta_validation.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return [path]


def plot_learning_rate(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``learning_rate.png`` when ``training.scheduler`` changed the rate during the run (nothing otherwise)."""
    lr = _series(list(records), "train", "lr")
    if len(set(lr.values())) < 2:
        return []
    fig = new_figure((6, 3.2))
    ax = fig.subplots()
    ax.plot(list(lr), list(lr.values()), color="tab:green")
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    path = Path(out_dir) / "learning_rate.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return [path]


def plot_run(records: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Every picture of a training run that its records support: learning curves and task weights (joint),
    the meta-validation curve with its CI band (meta-learning), the learning rate (with a schedule)."""
    records = list(records)
    return [*plot_learning_curves(records, out_dir), *plot_task_weights(records, out_dir),
            *plot_meta_validation(records, out_dir), *plot_learning_rate(records, out_dir)]
