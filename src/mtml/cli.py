"""The ``mtml`` command line. Every command is a thin call of a public library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mtml.errors import MtmlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mtml: multi-task learning, meta-learning and knowledge transfer on PyTorch.")
console = Console()
err_console = Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config file (see examples/configs/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: --set training.lr=0.01")] = None,
    out: Annotated[Path | None, typer.Option(help="new run directory (default: runs/<name>-<time>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory from its last checkpoint")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a config into a run directory, or --resume an interrupted run."""
    from mtml.config import load_config
    from mtml.experiment import resume_run
    from mtml.experiment import train as train_config
    from mtml.report import RichProgress

    progress = None if quiet else RichProgress("train", console=console)
    if resume is not None:
        if config is not None or set_:
            raise MtmlError("--resume continues a run with its own config.yaml; drop CONFIG and --set.")
        run, result = resume_run(resume, progress=progress)
    else:
        if config is None:
            raise MtmlError("give a CONFIG file to train, or --resume RUN to continue a run.")
        cfg = load_config(config, set_ or [])
        run, result = train_config(cfg, out, progress=progress)
    _print_scores(result.test or result.val, f"test metrics (best step {result.fit.best_step})")
    console.print(f"run directory: [bold]{run.path}[/] (summary.json, metrics.jsonl, checkpoints/, plots/)")


def _print_scores(scores: dict[str, dict[str, float]], title: str) -> None:
    from mtml.report import meta_table, metrics_table

    meta = {k: v for k, v in scores.items() if any("@" in m for m in v)}
    for name, values in meta.items():
        console.print(f"[bold]{name}[/]: meta-test over {int(values.get('num_tasks', 0))} held-out tasks "
                      "(mean ± 95% CI)")
        console.print(meta_table(values))
    rest = {k: v for k, v in scores.items() if k not in meta}
    if rest:
        console.print(metrics_table(rest, title=title))


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="run directory written by `mtml train`")],
    split: Annotated[str, typer.Option(help="train, val or test (joint runs)")] = "test",
    tasks: Annotated[int | None, typer.Option(help="meta-test tasks (meta-learning runs; default 600)")] = None,
    shots: Annotated[int | None, typer.Option(help="support examples per task/class (meta-learning runs)")] = None,
    steps: Annotated[int | None, typer.Option(help="inner steps at test time (meta-learning runs)")] = None,
) -> None:
    """Evaluate a run's best checkpoint: per-task metrics, or the meta-test protocol with 95% CIs."""
    from mtml.experiment import evaluate_run

    if split not in ("train", "val", "test"):
        raise MtmlError(f"--split must be train, val or test. Got {split!r}.")
    for name, value in (("--tasks", tasks), ("--shots", shots)):
        if value is not None and value < 1:
            raise MtmlError(f"{name} must be >= 1. Got {value}.")
    if steps is not None and steps < 0:
        raise MtmlError(f"--steps must be >= 0. Got {steps}.")
    scores = evaluate_run(run, split, num_tasks=tasks, shots=shots, steps=steps)
    _print_scores(scores, f"{run} — {split}")


@app.command("list")
def list_() -> None:
    """List registered datasets, models and weightings."""
    from rich.table import Table

    from mtml.datasets import DATASETS, FAMILIES
    from mtml.meta import ALGORITHMS
    from mtml.nn import ARCHITECTURES
    from mtml.weighting import WEIGHTINGS

    models = {"mlp": "MLP trunk shared by all tasks + a linear/MLP head per task (stems for other widths)",
              "mlp-separate": "model.share_trunk: false — one trunk per task (single-task baseline)"}
    algorithms = {"joint": "joint multi-task training, Σ w_i·L_i (weighting below)", **ALGORITHMS.describe()}
    sections = (("datasets (multi-task)", DATASETS.describe()), ("task families (meta-learning)", FAMILIES.describe()),
                ("models", models), ("architectures (model.architecture)", ARCHITECTURES.describe()),
                ("algorithms", algorithms), ("weightings", WEIGHTINGS.describe()))
    for title, items in sections:
        table = Table(title=title, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        for name, desc in items.items():
            table.add_row(name, desc)
        console.print(table)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="directory for the demo runs (default runs/demo-<time>)")] = None,
    quick: Annotated[bool, typer.Option(help="fewer steps (a smoke test)")] = False,
) -> None:
    """A short tour: multi-task vs single-task models on penguins and schools."""
    from mtml.demo import run_demo

    run_demo(out, quick=quick, console=console)


def main() -> None:
    """Entry point: runs the app, turning mtml's errors into one-line messages without a traceback."""
    try:
        app(standalone_mode=False)
    except MtmlError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted. Continue a run with: mtml train --resume RUN")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors (bad option, missing argument) come from typer's bundled click: show them its way.
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
