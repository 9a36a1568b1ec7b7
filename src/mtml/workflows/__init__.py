"""Workflows: what the ``mtml`` commands do, as library functions. Every one starts from one
:func:`build` of a validated :class:`~mtml.config.Config`.

| command | function |
|---|---|
| ``mtml train`` | :func:`train`, :func:`train_seeds`, :func:`resume_run` |
| ``mtml eval`` | :func:`evaluate_run` |
| ``mtml transfer`` | :func:`transfer` |
| ``mtml adapt`` | :func:`adapt` |
| ``mtml rank`` | :func:`rank_sources` |
| ``mtml affinity`` | :func:`task_affinity` |
| ``mtml demo`` | :func:`run_demo` |
| ``mtml export`` | :func:`export_run` |
"""

from mtml.workflows._adapt import AdaptResult, adapt, parse_methods
from mtml.workflows._affinity import AffinityResult, task_affinity
from mtml.workflows._build import (
    Built,
    build,
    dataset_tasks,
    default_run_dir,
    load_source,
    make_weighting,
    read_config,
    resolve_device,
    stop_rule,
    task_family,
)
from mtml.workflows._demo import compare, embedded_config, run_demo
from mtml.workflows._export import EXPORT_FORMATS, ExportedHead, ExportResult, export_run
from mtml.workflows._meta import evaluate_meta, fit_meta, judged_steps
from mtml.workflows._rank import rank_sources, source_outputs
from mtml.workflows._sweep import (
    SWEEP_KINDS,
    SweepParam,
    SweepResult,
    parse_param,
    sweep,
    sweep_table,
    write_sweep_outputs,
)
from mtml.workflows._train import evaluate_run, resume_run, train, train_seeds
from mtml.workflows._transfer import (
    TransferResult,
    check_output_dir,
    parse_sizes,
    subsample,
    t_critical,
    transfer,
    write_outputs,
)

__all__ = [
    "EXPORT_FORMATS",
    "SWEEP_KINDS",
    "AdaptResult",
    "AffinityResult",
    "Built",
    "ExportResult",
    "ExportedHead",
    "SweepParam",
    "SweepResult",
    "TransferResult",
    "adapt",
    "build",
    "check_output_dir",
    "compare",
    "dataset_tasks",
    "default_run_dir",
    "embedded_config",
    "evaluate_meta",
    "evaluate_run",
    "export_run",
    "fit_meta",
    "judged_steps",
    "load_source",
    "make_weighting",
    "parse_methods",
    "parse_param",
    "parse_sizes",
    "rank_sources",
    "read_config",
    "resolve_device",
    "resume_run",
    "run_demo",
    "source_outputs",
    "stop_rule",
    "subsample",
    "sweep",
    "sweep_table",
    "t_critical",
    "task_affinity",
    "task_family",
    "train",
    "train_seeds",
    "transfer",
    "write_outputs",
    "write_sweep_outputs",
]
