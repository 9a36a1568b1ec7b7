"""The ``mtml`` command line. Every command is a thin call of a public library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from mtml.errors import MtmlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mtml: multi-task learning, meta-learning and knowledge transfer on PyTorch.")
console = Console()
err_console = Console(stderr=True)
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT)


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config file (see examples/configs/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: --set training.lr=0.01")] = None,
    out: Annotated[Path | None, typer.Option(help="new run directory (default: runs/<name>-<time>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory from its last checkpoint")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    nproc: Annotated[int, typer.Option(help="ranks on this machine (data-parallel; see docs/distributed.md)")] = 1,
    dist_timeout: Annotated[float | None, typer.Option(help="seconds a rank waits for the others (default 120)")]
    = None,
    seeds: Annotated[str | None, typer.Option(help="one run per seed under OUT/seed-N, e.g. 0,1,2 (spread over "
                                                   "--nproc ranks)")] = None,
) -> None:
    """Train a config into a run directory, or --resume an interrupted run."""
    from mtml.config import load_config
    from mtml.experiment import resume_run
    from mtml.experiment import train as train_config
    from mtml.report import RichProgress

    seed_list = _seed_list(seeds)
    if nproc != 1 or dist_timeout is not None:
        _launch_train(config, set_ or [], out, resume, quiet, nproc, dist_timeout, seeds)
        return
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if seed_list is not None:
        _train_seeds(config, set_ or [], out, resume, seed_list, main_rank)
        return
    progress = None if quiet or not main_rank else RichProgress("train", console=console)
    if resume is not None:
        if config is not None or set_:
            raise MtmlError("--resume continues a run with its own config.yaml; drop CONFIG and --set.")
        run, result = resume_run(resume, progress=progress)
    else:
        if config is None:
            raise MtmlError("give a CONFIG file to train, or --resume RUN to continue a run.")
        cfg = load_config(config, set_ or [])
        run, result = train_config(cfg, out, progress=progress)
    if not main_rank:
        return
    _print_scores(result.test or result.val, f"test metrics (best step {result.fit.best_step})")
    console.print(f"run directory: [bold]{run.path}[/] (summary.json, metrics.jsonl, checkpoints/, plots/)")


def _seed_list(seeds: str | None) -> list[int] | None:
    if seeds is None:
        return None
    try:
        return [int(s) for s in seeds.split(",")]
    except ValueError:
        raise MtmlError(f"--seeds must be comma-separated integers such as 0,1,2. Got {seeds!r}.") from None


def _train_seeds(config: Path | None, set_: list[str], out: Path | None, resume: Path | None, seeds: list[int],
                 main_rank: bool) -> None:
    from mtml.config import load_config
    from mtml.experiment import train_seeds

    if resume is not None or config is None:
        raise MtmlError("--seeds trains a CONFIG once per seed; it cannot --resume (resume each seed-N run).")
    results = train_seeds(load_config(config, set_), seeds, out)
    for seed, (path, summary) in zip(seeds, results, strict=True) if main_rank else ():
        _print_scores(summary["test"] or summary["val"], f"seed {seed}: test metrics (best step "
                                                         f"{summary['best_step']})")
        console.print(f"seed {seed}: run directory [bold]{path}[/]")


def _launch_train(config: Path | None, set_: list[str], out: Path | None, resume: Path | None, quiet: bool,
                  nproc: int, timeout: float | None, seeds: str | None = None) -> None:
    """``--nproc N``: start N local ranks of the same command (see :mod:`mtml.engine.dist_launch`)."""
    from mtml.config import load_config
    from mtml.engine import Run
    from mtml.experiment import default_run_dir

    args = ["train", *(["--quiet"] if quiet else []), *(["--seeds", seeds] if seeds is not None else [])]
    if resume is not None:
        if config is not None or set_:
            raise MtmlError("--resume continues a run with its own config.yaml; drop CONFIG and --set.")
        run_dir = resume
        args += ["--resume", str(resume)]
    else:
        if config is None:
            raise MtmlError("give a CONFIG file to train, or --resume RUN to continue a run.")
        run_dir = out or default_run_dir(load_config(config, set_))  # one name for every rank
        Run.check_new(run_dir)  # said once, here, rather than by every rank
        args += [str(config), *[a for s in set_ for a in ("--set", s)], "--out", str(run_dir)]
    _start_ranks(args, nproc, timeout, run_dir)


def _start_ranks(args: list[str], nproc: int, timeout: float | None, run_dir: Path | None = None) -> None:
    """Run ``mtml <args>`` as ``nproc`` local ranks (see :mod:`mtml.engine.dist_launch`)."""
    from mtml.engine.dist_launch import launch

    _check_launch(timeout)
    launch(args, nproc, run_dir=run_dir, timeout=timeout, entry=main)


def _check_launch(timeout: float | None) -> None:
    if "WORLD_SIZE" in os.environ:
        raise MtmlError("--nproc and --dist-timeout start ranks themselves; under torchrun leave them out (set "
                        "MTML_DIST_TIMEOUT for the timeout).")
    if timeout is not None and not timeout > 0:
        raise MtmlError(f"--dist-timeout must be > 0 seconds. Got {timeout}.")


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
    nproc: Annotated[int, typer.Option(help="ranks on this machine: the episodes are spread over them")] = 1,
    dist_timeout: Annotated[float | None, typer.Option(help="seconds a rank waits for the others (default 120)")]
    = None,
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
    if nproc != 1 or dist_timeout is not None:
        from mtml.engine import Run

        Run.open(run)  # a wrong path is said once, here, rather than by every rank
        given = (("--tasks", tasks), ("--shots", shots), ("--steps", steps))
        _start_ranks(["eval", str(run), "--split", split,
                      *[a for name, value in given if value is not None for a in (name, str(value))]], nproc,
                     dist_timeout)
        return
    scores = evaluate_run(run, split, num_tasks=tasks, shots=shots, steps=steps)
    if os.environ.get("RANK", "0") == "0":  # under torchrun (or --nproc) only rank 0 prints
        _print_scores(scores, f"{run} — {split}")


@app.command("list")
def list_() -> None:
    """List registered datasets, models and weightings."""
    from rich.table import Table

    from mtml.datasets import DATASETS, FAMILIES
    from mtml.meta import ALGORITHMS
    from mtml.nn import ARCHITECTURES, BACKBONES
    from mtml.transfer import ESTIMATORS, STRATEGIES
    from mtml.weighting import WEIGHTINGS

    models = {"mlp": "MLP trunk shared by all tasks + a linear/MLP head per task (stems for other widths)",
              "mlp-separate": "model.share_trunk: false — one trunk per task (single-task baseline)"}
    algorithms = {"joint": "joint multi-task training, Σ w_i·L_i (weighting below)", **ALGORITHMS.describe()}
    sections = (("datasets (multi-task)", DATASETS.describe()), ("task families (meta-learning)", FAMILIES.describe()),
                ("models", models), ("architectures (model.architecture)", ARCHITECTURES.describe()),
                ("backbones (model.backbone)", BACKBONES.describe()), ("algorithms", algorithms),
                ("weightings", WEIGHTINGS.describe()), ("transfer strategies (mtml transfer)", STRATEGIES.describe()),
                ("transferability estimators (mtml rank)", ESTIMATORS.describe()))
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


@app.command()
def affinity(
    config: Annotated[Path, typer.Argument(help="YAML config of a joint (multi-task) run")],
    groups: Annotated[int | None, typer.Option(help="number of task groups (default: best of 1..4)")] = None,
    out: Annotated[Path | None, typer.Option(help="new run directory (default: runs/<name>-<time>-affinity)")] = None,
    every: Annotated[int, typer.Option(help="record the affinity every N training steps")] = 10,
    lookahead_lr: Annotated[float | None, typer.Option(help="lookahead SGD step (default: training.lr)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: --set training.lr=0.01")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train CONFIG while recording TAG inter-task affinity; write a heatmap and suggested task groups."""
    from rich.table import Table

    from mtml.affinity_run import display_scale, task_affinity
    from mtml.config import load_config
    from mtml.report import RichProgress

    progress = None if quiet else RichProgress("affinity", console=console)
    res = task_affinity(load_config(config, set_ or []), out, groups=groups, every=every, lookahead_lr=lookahead_lr,
                        progress=progress)
    exp = display_scale(res.matrix)
    unit = f" (in units of 1e{exp})" if exp else ""
    table = Table(title=f"affinity of row task onto column task{unit}, {res.steps_recorded} recorded steps",
                  show_edge=False)
    table.add_column("from \\ onto", no_wrap=True)
    for j in range(len(res.names)):
        table.add_column(str(j), justify="right", no_wrap=True)
    for i, name in enumerate(res.names):
        table.add_row(f"{i} {name}", *(f"{v / 10**exp:+.2f}" for v in res.matrix[i]))
    console.print(table)
    for k, g in res.groupings.items():
        mark = "  [bold green]← suggested[/]" if k == res.suggested else ""
        console.print(f"{k} group(s), score {g.score:+.3g} ({g.method}): {g.named(res.names)}{mark}")
    if res.negative:
        console.print("[bold red]negative transfer[/] (95% CI below 0): "
                      + ", ".join(f"{a} → {b}" for a, b in res.negative))
    console.print(f"run directory: [bold]{res.run.path}[/] (affinity.json, plots/affinity.png)")


@app.command()
def rank(
    runs: Annotated[list[Path], typer.Argument(help="source run directories to rank")],
    target: Annotated[Path, typer.Option(help="YAML config whose tasks are the target")],
    task: Annotated[str | None, typer.Option(help="rank for this target task only (default: every task)")] = None,
    source_task: Annotated[str | None, typer.Option(help="source head for LEEP/NCE (default: first classifier)")]
    = None,
    split: Annotated[str, typer.Option(help="target split the estimates read")] = "train",
    by: Annotated[str, typer.Option(help="estimator to sort by")] = "logme",
    out: Annotated[Path | None, typer.Option(help="also write the ranking as JSON here")] = None,
) -> None:
    """Rank source runs for a --target config by LogME, LEEP, NCE and H-score (no fine-tuning)."""
    import json

    from rich.table import Table

    from mtml.atomic import atomic_write_text
    from mtml.config import load_config
    from mtml.rank_run import rank_sources

    ranking = rank_sources(load_config(target, []), runs, task=task, source_task=source_task, split=split, by=by)
    for name, rows in ranking.items():
        table = Table(title=f"target task '{name}' — sources ranked by {by}")
        table.add_column("#", justify="right")
        table.add_column("source run")
        table.add_column("head")
        estimators = list(rows[0]["scores"])
        for e in estimators:
            table.add_column(e, justify="right")
        for i, r in enumerate(rows, 1):
            cells = ["—" if r["scores"][e] is None else f"{r['scores'][e]:.4f}" for e in estimators]
            table.add_row(str(i), r["run"], r["source_task"] or "—", *cells)
        console.print(table)
    if out is not None:
        atomic_write_text(out, json.dumps(ranking, indent=2) + "\n")
        console.print(f"ranking written to [bold]{out}[/]")


@app.command("transfer")
def transfer_(
    run: Annotated[Path, typer.Argument(help="source run directory (joint or meta-learning)")],
    target: Annotated[Path, typer.Option(help="YAML config whose tasks (or task family) are the target")],
    strategies: Annotated[str | None, typer.Option(help="comma-separated strategies (default: all that fit)")]
    = None,
    sizes: Annotated[str, typer.Option(help="training examples per class (per task for regression)")] = "1,5,20,all",
    repeats: Annotated[int, typer.Option(help="random draws of the examples per size")] = 5,
    seed: Annotated[int, typer.Option(help="seed of the draws")] = 0,
    option: Annotated[list[str] | None, typer.Option(help="strategy option: --option finetune_last.k=2")] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default: RUN/transfer-<target>-<time>)")]
    = None,
    nproc: Annotated[int, typer.Option(help="ranks on this machine: the draws are spread over them")] = 1,
    dist_timeout: Annotated[float | None, typer.Option(help="seconds a rank waits for the others (default 120)")]
    = None,
) -> None:
    """Transfer a run to a target config with each strategy; metric and gain over scratch per size, with CIs."""
    import time

    import yaml

    from mtml.report.transfer import CAPTION, rich_tables
    from mtml.transfer_run import check_output_dir, parse_sizes, transfer

    names = [s.strip() for s in strategies.split(",") if s.strip()] if strategies is not None else None
    options: dict[str, dict[str, object]] = {}
    for item in option or []:
        key, eq, value = item.partition("=")
        name, dot, opt = key.partition(".")
        if not eq or not dot or not name or not opt:
            raise MtmlError(f"--option {item!r}: write STRATEGY.KEY=VALUE, e.g. --option finetune_last.k=2.")
        options.setdefault(name, {})[opt] = yaml.safe_load(value)
    parsed = parse_sizes(sizes)
    if repeats < 1:
        raise MtmlError(f"--repeats must be >= 1. Got {repeats}.")
    out = out or run / f"transfer-{target.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if nproc != 1 or dist_timeout is not None:  # the same command on N ranks, all writing to the one `out`
        from mtml.config import load_config
        from mtml.engine import Run

        Run.open(run)  # wrong paths and names are said once, here, rather than by every rank
        load_config(target)
        check_output_dir(out)
        _start_ranks(["transfer", str(run), "--target", str(target), "--sizes", sizes, "--repeats", str(repeats),
                      "--seed", str(seed), "--out", str(out), *(["--strategies", strategies] if strategies else []),
                      *[a for item in option or [] for a in ("--option", item)]], nproc, dist_timeout)
        return
    if os.environ.get("RANK", "0") != "0":  # under torchrun (or --nproc) only rank 0 prints
        transfer(run, target, strategies=names, sizes=parsed, repeats=repeats, seed=seed, options=options, out=out)
        return
    with console.status("transferring…"):
        result = transfer(run, target, strategies=names, sizes=parsed, repeats=repeats, seed=seed,
                          options=options, out=out)
    for table in rich_tables(result):
        console.print(table)
    console.print(CAPTION, markup=False, highlight=False)
    console.print(f"written to [bold]{out}[/] (transfer.json, transfer.md, plots/transfer.png)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app on ``argv`` (default: the command line's arguments), turning mtml's errors
    into one-line messages without a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except MtmlError as exc:
        if getattr(exc, "echo_of_rank", None) is not None:
            sys.exit(2)  # rank 0 printed this error already
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
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
    # typer answers Ctrl-C (and typer.Exit) in non-standalone mode with a returned exit code, not an exception
    if isinstance(code, int) and code:
        if code == INTERRUPTED:
            _interrupted()
        sys.exit(code)


def _interrupted() -> None:
    """Ctrl-C: one line (from the launcher of an ``--nproc`` run or rank 0 under torchrun), exit status 130."""
    if "MTML_LAUNCHED" not in os.environ and os.environ.get("RANK", "0") == "0":
        err_console.print("interrupted. Continue a run with: mtml train --resume RUN")
    sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
