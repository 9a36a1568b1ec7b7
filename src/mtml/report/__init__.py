"""Reporting: plots (learning curves, transfer, task affinity), terminal tables, the progress bar and the
TensorBoard / MLflow trackers.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot state)."""

from mtml.report._affinity import display_scale, plot_affinity
from mtml.report._html import RunView, SweepView, load_runs, render_report, write_report
from mtml.report._plots import (
    new_figure,
    plot_learning_curves,
    plot_learning_rate,
    plot_meta_validation,
    plot_run,
    plot_task_weights,
    save_figure,
)
from mtml.report._progress import RichProgress
from mtml.report._sweep import plot_sweep
from mtml.report._tables import comparison_table, meta_table, metrics_table
from mtml.report._tracking import Trackers, check_trackers, open_trackers
from mtml.report._transfer import (
    TRANSFER_CAPTION,
    TransferTable,
    plot_transfer,
    transfer_markdown,
    transfer_tables,
)

__all__ = [
    "TRANSFER_CAPTION", "RichProgress", "RunView", "SweepView", "Trackers", "TransferTable", "check_trackers",
    "comparison_table",
    "display_scale", "load_runs", "meta_table", "metrics_table", "new_figure", "open_trackers", "plot_affinity",
    "plot_learning_curves", "plot_learning_rate", "plot_meta_validation", "plot_run", "plot_sweep",
    "plot_task_weights",
    "plot_transfer", "render_report", "save_figure", "transfer_markdown", "transfer_tables", "write_report",
]
