"""Terminal tables of per-task metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table

__all__ = ["comparison_table", "meta_table", "metrics_table"]

Metrics = Mapping[str, Mapping[str, float]]


def metrics_table(metrics: Metrics, *, title: str = "", max_rows: int = 20) -> Table:
    """One row per task, one column per metric (tasks beyond ``max_rows`` are summarised as a mean row)."""
    names = sorted({k for m in metrics.values() for k in m})
    table = Table(title=title or None)
    table.add_column("task")
    for n in names:
        table.add_column(n, justify="right")
    items = list(metrics.items())
    for task, m in items[:max_rows]:
        table.add_row(task, *(_fmt(m.get(n)) for n in names))
    if len(items) > max_rows:
        table.add_row(f"… mean of all {len(items)}", *(_fmt(_mean([m.get(n) for _, m in items])) for n in names))
    return table


def comparison_table(
    rows: Sequence[tuple[str, str, float, float, bool]], *, title: str, labels: tuple[str, str]
) -> Table:
    """Rows ``(task, metric, value_a, value_b, higher_is_better)`` with the better value marked."""
    table = Table(title=title)
    for col in ("task", "metric", labels[0], labels[1], "better"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metric, a, b, higher in rows:
        better = "tie" if a == b else labels[0] if (a > b) == higher else labels[1]
        table.add_row(task, metric, _fmt(a), _fmt(b), better)
    return table


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def meta_table(scores: Mapping[str, float], *, title: str | None = None) -> Table:
    """Meta-test scores ``{"loss@S": mean, "loss@S_ci95": half-width, ...}`` as one row per inner-step count."""
    steps = sorted({int(k.split("@")[1]) for k in scores if "@" in k and not k.endswith("_ci95")})
    metrics = sorted({k.split("@")[0] for k in scores if "@" in k})
    table = Table(title=title)
    table.add_column("inner steps", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    for s in steps:
        cells = [f"{scores[f'{m}@{s}']:.4f} ± {scores.get(f'{m}@{s}_ci95', float('nan')):.4f}"
                 if f"{m}@{s}" in scores else "—" for m in metrics]
        table.add_row(str(s), *cells)
    return table
