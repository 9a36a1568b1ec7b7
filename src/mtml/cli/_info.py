"""``mtml list``, ``mtml demo`` and ``mtml report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtml.cli._app import console


def list_() -> None:
    """List registered datasets, models and weightings."""
    from rich.table import Table

    from mtml.datasets import DATASETS, FAMILIES
    from mtml.meta import ALGORITHMS
    from mtml.nn import ARCHITECTURES, BACKBONES
    from mtml.transfer import ADAPTERS, ESTIMATORS, STRATEGIES
    from mtml.weighting import WEIGHTINGS

    models = {"mlp": "MLP trunk shared by all tasks + a linear/MLP head per task (stems for other widths)",
              "mlp-separate": "model.share_trunk: false — one trunk per task (single-task baseline)"}
    algorithms = {"joint": "joint multi-task training, Σ w_i·L_i (weighting below)", **ALGORITHMS.describe()}
    sections = (("datasets (multi-task)", DATASETS.describe()), ("task families (meta-learning)", FAMILIES.describe()),
                ("models", models), ("architectures (model.architecture)", ARCHITECTURES.describe()),
                ("backbones (model.backbone)", BACKBONES.describe()), ("algorithms", algorithms),
                ("weightings", WEIGHTINGS.describe()), ("transfer strategies (mtml transfer)", STRATEGIES.describe()),
                ("transferability estimators (mtml rank)", ESTIMATORS.describe()),
                ("domain adaptation (mtml adapt)", ADAPTERS.describe()))
    for title, items in sections:
        table = Table(title=title, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        for name, desc in items.items():
            table.add_row(name, desc)
        console.print(table)


def demo(
    out: Annotated[Path | None, typer.Option(help="directory for the demo runs (default runs/demo-<time>)")] = None,
    quick: Annotated[bool, typer.Option(help="fewer steps (a smoke test)")] = False,
) -> None:
    """A short tour: multi-task vs single-task models on penguins and schools."""
    from mtml.workflows import run_demo

    run_demo(out, quick=quick, console=console)


def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories (or mtml sweep folders) to compare",
                                                show_default=False)],
    out: Annotated[Path | None, typer.Option(help="the HTML file (default: RUN/report.html for one run, "
                                                  "report.html here for several)")] = None,
    title: Annotated[str | None, typer.Option(help="the page's title")] = None,
) -> None:
    """One self-contained HTML page comparing runs: config differences, test metrics with CIs, plots."""
    from mtml.report import write_report

    target = out or (runs[0] / "report.html" if len(runs) == 1 else Path("report.html"))
    path = write_report(runs, target, title=title)
    console.print(f"report: [bold]{path}[/] ({len(runs)} run{'s' if len(runs) > 1 else ''}; opens offline)")


def export(
    run: Annotated[Path, typer.Argument(help="the run directory", show_default=False)],
    format_: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="folder for the files (default RUN/export)")] = None,
) -> None:
    """Export a run's best model (one file per task head) with a model card; each file is checked against
    PyTorch (onnxruntime for ONNX) before it is kept."""
    from mtml.workflows import export_run

    result = export_run(run, format_, out)
    for head in result.heads:
        console.print(f"{head.name}: {result.folder / head.file} (input {head.input_shape}, {head.outputs} "
                      f"outputs; max |Δ| vs PyTorch {head.max_abs_diff:.1e})")
    console.print(f"model card: [bold]{result.folder / 'MODEL_CARD.md'}[/]")
