"""Reporting: learning-curve plots, terminal tables and the progress bar."""

from mtml.report.plots import plot_learning_curves
from mtml.report.progress import RichProgress
from mtml.report.tables import comparison_table, meta_table, metrics_table

__all__ = ["RichProgress", "comparison_table", "meta_table", "metrics_table", "plot_learning_curves"]
