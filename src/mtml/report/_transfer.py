"""Tables and the metric-vs-size plot of a transfer experiment (:class:`mtml.workflows.TransferResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.markup import escape
from rich.table import Table

from mtml.report._plots import new_figure, save_figure

__all__ = ["TRANSFER_CAPTION", "TransferTable", "plot_transfer", "transfer_markdown", "transfer_tables"]


class TransferTable(Protocol):
    """What the tables and the plot read of a transfer result (:class:`mtml.workflows.TransferResult`)."""

    @property
    def source(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def sizes(self) -> Sequence[int | str]: ...

    @property
    def strategies(self) -> Sequence[str]: ...

    @property
    def repeats(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def seconds(self) -> float: ...

    @property
    def higher_is_better(self) -> dict[str, bool]: ...

    @property
    def scores(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]: ...

    @property
    def gains(self) -> dict[str, dict[str, dict[str, dict[str, Any]]]]: ...


def _cell(score: dict[str, Any]) -> str:
    return f"{score['mean']:.4f} ± {score['ci95']:.4f}"


def _gain(gain: dict[str, Any] | None) -> str:
    if gain is None:
        return "(baseline)"
    mark = " ⚠ negative transfer" if gain["verdict"] == "negative transfer" else " ✓" if gain["verdict"] == "gain" \
        else ""
    return f"{gain['mean']:+.4f} ± {gain['ci95']:.4f}{mark}"


def _rows(result: TransferTable, metric: str) -> list[list[str]]:
    sizes = [str(s) for s in result.sizes]
    rows = []
    for name in result.strategies:
        scores = result.scores[metric][name]
        gains = result.gains.get(metric, {}).get(name, {})
        rows.append([name, *[f"{_cell(scores[s])}  [{_gain(gains.get(s))}]" for s in sizes]])
    return rows


def _header(result: TransferTable, metric: str) -> list[str]:
    first = result.scores[metric][result.strategies[0]]
    return ["strategy", *[f"{s} (n≈{first[str(s)]['n_train']:.0f})" for s in result.sizes]]


def _title(result: TransferTable, metric: str) -> str:
    better = "higher" if result.higher_is_better[metric] else "lower"
    return f"{metric} ({better} is better) on the target's test split, mean ± 95% CI over {result.repeats} draws"


TRANSFER_CAPTION = "[gain over scratch ± 95% CI, paired over draws; ✓ gain, ⚠ negative transfer]"


def transfer_tables(result: TransferTable) -> list[Table]:
    """One terminal table per primary metric: strategies × sizes, each cell metric and gain over scratch."""
    tables = []
    for metric in result.scores:
        table = Table(title=_title(result, metric), title_justify="left")
        for i, col in enumerate(_header(result, metric)):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in _rows(result, metric):
            table.add_row(*(escape(cell) for cell in row))
        tables.append(table)
    return tables


def transfer_markdown(result: TransferTable) -> str:
    """The same tables in Markdown, with the source, target and any negative-transfer warning."""
    lines = [f"# Transfer: {result.source} → {result.target}", ""]
    for metric in result.scores:
        head = _header(result, metric)
        lines += [f"{_title(result, metric)}; {TRANSFER_CAPTION}:", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in _rows(result, metric)]
        bad = [f"{name} at size {size}" for name, by in result.gains.get(metric, {}).items()
               for size, g in by.items() if g["verdict"] == "negative transfer"]
        lines += ["", f"Negative transfer ({metric}): {', '.join(bad)}." if bad else
                  f"No negative transfer ({metric}): no gain interval lies entirely below 0.", ""]
    lines.append(f"{result.repeats} repeats, seed {result.seed}, {result.seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def plot_transfer(result: TransferTable, path: str | Path) -> Path:
    """Metric vs training-set size, one line per strategy with its 95% CI band (one panel per metric)."""
    metrics = list(result.scores)
    fig = new_figure((6.5 * len(metrics), 4.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    xs = list(range(len(result.sizes)))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name in result.strategies:
            by = result.scores[metric][name]
            mean = [by[str(s)]["mean"] for s in result.sizes]
            ci = [by[str(s)]["ci95"] if by[str(s)]["ci95"] == by[str(s)]["ci95"] else 0.0 for s in result.sizes]
            style = {"color": "black", "ls": "--"} if name == "scratch" else {}
            line = ax.plot(xs, mean, marker="o", label=name, **style)[0]
            ax.fill_between(xs, [m - c for m, c in zip(mean, ci, strict=True)],
                            [m + c for m, c in zip(mean, ci, strict=True)], color=line.get_color(), alpha=0.15)
        first = result.scores[metric][result.strategies[0]]
        ax.set_xticks(xs, [f"{s}\n(n≈{first[str(s)]['n_train']:.0f})" for s in result.sizes])
        better = "higher" if result.higher_is_better[metric] else "lower"
        ax.set(xlabel="training examples per class (per task for regression)",
               ylabel=f"test {metric} ({better} is better)", title=f"{result.target}: {metric} vs size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
