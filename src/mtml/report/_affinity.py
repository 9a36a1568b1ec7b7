"""The TAG task-affinity heatmap (``plots/affinity.png`` of ``mtml affinity``) and its display scale."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.patches import Rectangle

from mtml.report._plots import new_figure, save_figure

__all__ = ["display_scale", "plot_affinity"]


def display_scale(matrix: Sequence[Sequence[float]]) -> int:
    """Power of ten ``e`` such that the largest off-diagonal ``|A[i][j]| / 10**e`` lies in [1, 10) (0 if all 0)."""
    off = [abs(v) for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v != 0]
    return math.floor(math.log10(max(off))) if off else 0


def plot_affinity(matrix: Sequence[Sequence[float]], names: Sequence[str], path: str | Path, *,
                  flagged: set[tuple[str, str]] | None = None, groups: Sequence[Sequence[str]] | None = None) -> Path:
    """Heatmap of ``matrix`` (row i onto column j), tasks ordered by ``groups``; flagged pairs get an ×."""
    order = [n for g in groups for n in g] if groups else list(names)
    idx = [list(names).index(n) for n in order]
    a = torch.tensor(matrix, dtype=torch.float64)[idx][:, idx]
    off = a[~torch.eye(len(idx), dtype=torch.bool)]
    lim = float(off.abs().max()) if off.numel() and float(off.abs().max()) > 0 else 1.0
    size = max(4.0, 0.55 * len(idx) + 2)
    fig = new_figure((size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(a.numpy(), cmap="RdBu", vmin=-lim, vmax=lim)  # diagonal (self-affinity) may saturate
    ax.set_xticks(range(len(idx)), order, rotation=90, fontsize=8)
    ax.set_yticks(range(len(idx)), order, fontsize=8)
    ax.set_xlabel("onto task j")
    ax.set_ylabel("lookahead step on task i")
    exp = display_scale(a.tolist())
    if len(idx) <= 16:
        for r in range(len(idx)):
            for c in range(len(idx)):
                mark = "×" if flagged and (order[r], order[c]) in flagged else ""
                ax.text(c, r, f"{float(a[r, c]) / 10**exp:.2f}{mark}", ha="center", va="center", fontsize=7)
    edge = 0
    for g in groups or []:  # outline each suggested group
        ax.add_patch(Rectangle((edge - 0.5, edge - 0.5), len(g), len(g), fill=False, lw=2, color="black"))
        edge += len(g)
    fig.colorbar(im, ax=ax, label="affinity (1 − L_j after / L_j before)")
    unit = f", cells in units of 1e{exp}" if exp else ""
    ax.set_title(f"TAG inter-task affinity (× = negative transfer{unit})", fontsize=10)
    return save_figure(fig, path, dpi=120)
