"""A sweep's pictures: the objective of every trial with the best so far, and the objective by parameter value."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtml.report._plots import new_figure, save_figure

__all__ = ["plot_sweep"]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def plot_sweep(rows: Sequence[Mapping[str, Any]], params: Sequence[Mapping[str, Any]],
               out_dir: str | Path) -> list[Path]:
    """Write ``sweep_history.png`` and ``sweep_params.png`` for the trial ``rows`` (see
    :func:`mtml.workflows.sweep_table`); pruned trials are drawn at their last validation value. → paths."""
    out = Path(out_dir)
    shown = [r for r in rows if _finite(r.get("value")) and r.get("state") in ("complete", "pruned")]
    if not shown:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig = new_figure((7.5, 4.2))
    ax = fig.subplots()
    done = [r for r in shown if r["state"] == "complete"]
    pruned = [r for r in shown if r["state"] == "pruned"]
    ax.scatter([r["trial"] for r in done], [r["value"] for r in done], s=22, color="tab:blue", label="complete")
    if pruned:
        ax.scatter([r["trial"] for r in pruned], [r["value"] for r in pruned], s=22, marker="x", color="tab:gray",
                   label="pruned (last validation)")
    best, xs, ys = math.inf, [], []
    for r in sorted(done, key=lambda r: r["trial"]):
        best = min(best, r["value"])
        xs.append(r["trial"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(title="sweep: validation objective per trial (lower is better)", xlabel="trial", ylabel="objective")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "sweep_history.png"))
    if params:
        fig = new_figure((3.6 * min(len(params), 4), 3.4 * math.ceil(len(params) / 4)))
        axes = fig.subplots(math.ceil(len(params) / 4), min(len(params), 4), squeeze=False).ravel()
        for ax, p in zip(axes, params, strict=False):
            key, kind = p["key"], p["kind"]
            if kind == "choice":
                labels = [json.dumps(c) for c in p["choices"]]
                pos = {label: i for i, label in enumerate(labels)}
                x_of: list[Any] = [pos.get(json.dumps(r.get(key)), -1) for r in shown]
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            else:
                x_of = [r.get(key) for r in shown]
                if kind in ("log", "logint"):
                    ax.set_xscale("log")
            colours = ["tab:blue" if r["state"] == "complete" else "tab:gray" for r in shown]
            ax.scatter(x_of, [r["value"] for r in shown], s=18, c=colours)
            ax.set(xlabel=key, ylabel="objective")
        for ax in axes[len(params):]:
            ax.set_visible(False)
        paths.append(save_figure(fig, out / "sweep_params.png"))
    return paths
