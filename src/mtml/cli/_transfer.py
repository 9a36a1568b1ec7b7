"""``mtml affinity``, ``mtml rank`` and ``mtml transfer``: what tasks and sources give each other."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtml.cli._app import console, prints
from mtml.cli._runs import start_ranks
from mtml.errors import ConfigError, MtmlError


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

    from mtml.config import load_config
    from mtml.report import RichProgress, display_scale
    from mtml.workflows import task_affinity

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
    """Rank source runs for a --target config by LogME, LEEP, NCE, H-score and TransRate (no fine-tuning)."""
    import json

    from rich.table import Table

    from mtml.atomic import atomic_write_text
    from mtml.config import load_config
    from mtml.workflows import rank_sources

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

    from mtml.report import TRANSFER_CAPTION, transfer_tables
    from mtml.workflows import check_output_dir, parse_sizes, transfer

    names = [s.strip() for s in strategies.split(",") if s.strip()] if strategies is not None else None
    options = parse_options(option, "STRATEGY", "finetune_last.k=2")
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
        start_ranks(["transfer", str(run), "--target", str(target), "--sizes", sizes, "--repeats", str(repeats),
                      "--seed", str(seed), "--out", str(out), *(["--strategies", strategies] if strategies else []),
                      *[a for item in option or [] for a in ("--option", item)]], nproc, dist_timeout)
        return
    if not prints():
        transfer(run, target, strategies=names, sizes=parsed, repeats=repeats, seed=seed, options=options, out=out)
        return
    with console.status("transferring…"):
        result = transfer(run, target, strategies=names, sizes=parsed, repeats=repeats, seed=seed,
                          options=options, out=out)
    for table in transfer_tables(result):
        console.print(table)
    console.print(TRANSFER_CAPTION, markup=False, highlight=False)
    console.print(f"written to [bold]{out}[/] (transfer.json, transfer.md, plots/transfer.png)")


def parse_options(items: list[str] | None, what: str, example: str) -> dict[str, dict[str, object]]:
    """``--option NAME.KEY=VALUE`` items → ``{NAME: {KEY: value}}``, each value read as YAML (a word stays a
    string); ``what`` and ``example`` go into the one-line error for a malformed item."""
    from mtml._yaml import load_yaml

    options: dict[str, dict[str, object]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        name, dot, opt = key.partition(".")
        if not eq or not dot or not name or not opt:
            raise MtmlError(f"--option {item!r}: write {what}.KEY=VALUE, e.g. --option {example}.")
        try:
            options.setdefault(name, {})[opt] = load_yaml(value, f"--option {item!r}")
        except ConfigError:
            options.setdefault(name, {})[opt] = value
    return options
