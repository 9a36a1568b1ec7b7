"""``mtml train`` and ``mtml eval``, and starting local ranks for any command (``--nproc``)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mtml.cli._app import console, err_console, prints
from mtml.errors import MtmlError


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
    auto_resume: Annotated[bool, typer.Option(help="when --out holds an unfinished run of the same config, "
                                                   "continue it (--no-auto-resume: refuse any existing --out)")]
    = True,
) -> None:
    """Train a config into a run directory (continuing it if it is this config's unfinished run), or --resume
    an interrupted run."""
    from mtml.config import load_config
    from mtml.report import RichProgress
    from mtml.workflows import resume_run
    from mtml.workflows import train as train_config

    seed_list = _seed_list(seeds)
    if nproc != 1 or dist_timeout is not None:
        _launch_train(config, set_ or [], out, resume, quiet, nproc, dist_timeout, seeds, auto_resume)
        return
    main_rank = prints()
    if seed_list is not None:
        _train_seeds(config, set_ or [], out, resume, seed_list, main_rank, auto_resume)
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
        run, result = train_config(cfg, out, progress=progress, auto_resume=auto_resume,
                                   announce=console.print if main_rank else None)
    if not main_rank:
        return
    _print_scores(result.test or result.val, f"test metrics (best step {result.fit.best_step})")
    console.print(f"run directory: [bold]{run.path}[/] (summary.json, metrics.jsonl, checkpoints/, plots/)")
    _print_trackers(run.path)


def _print_trackers(path: Path) -> None:
    """How to open what ``logging:`` wrote (TensorBoard event files, the MLflow run)."""
    if (path / "tensorboard").is_dir():
        console.print(f"TensorBoard: tensorboard --logdir {path / 'tensorboard'}")
    ids = path / "mlflow.json"
    if ids.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            info = json.loads(ids.read_text(encoding="utf-8"))
            console.print(f"MLflow: run {info['run_id']}; mlflow ui --backend-store-uri {info['tracking_uri']}")


def _seed_list(seeds: str | None) -> list[int] | None:
    if seeds is None:
        return None
    try:
        return [int(s) for s in seeds.split(",")]
    except ValueError:
        raise MtmlError(f"--seeds must be comma-separated integers such as 0,1,2. Got {seeds!r}.") from None


def _train_seeds(config: Path | None, set_: list[str], out: Path | None, resume: Path | None, seeds: list[int],
                 main_rank: bool, auto_resume: bool = True) -> None:
    from mtml.config import load_config
    from mtml.workflows import train_seeds

    if resume is not None or config is None:
        raise MtmlError("--seeds trains a CONFIG once per seed; it cannot --resume (resume each seed-N run).")
    results = train_seeds(load_config(config, set_), seeds, out, auto_resume=auto_resume)
    for seed, (path, summary) in zip(seeds, results, strict=True) if main_rank else ():
        _print_scores(summary["test"] or summary["val"], f"seed {seed}: test metrics (best step "
                                                         f"{summary['best_step']})")
        console.print(f"seed {seed}: run directory [bold]{path}[/]")


def _launch_train(config: Path | None, set_: list[str], out: Path | None, resume: Path | None, quiet: bool,
                  nproc: int, timeout: float | None, seeds: str | None = None, auto_resume: bool = True) -> None:
    """``--nproc N``: start N local ranks of the same command (see :func:`mtml.engine.launch`)."""
    from mtml.config import load_config
    from mtml.engine import Run
    from mtml.workflows import default_run_dir

    args = ["train", *(["--quiet"] if quiet else []), *(["--seeds", seeds] if seeds is not None else []),
            *([] if auto_resume else ["--no-auto-resume"])]
    if resume is not None:
        if config is not None or set_:
            raise MtmlError("--resume continues a run with its own config.yaml; drop CONFIG and --set.")
        run_dir = resume
        args += ["--resume", str(resume)]
    else:
        if config is None:
            raise MtmlError("give a CONFIG file to train, or --resume RUN to continue a run.")
        cfg = load_config(config, set_)
        run_dir = out or default_run_dir(cfg)  # one name for every rank
        if auto_resume and seeds is None:
            Run.reopen(run_dir, cfg.to_dict())  # a refusal is said once, here, rather than by every rank
        elif not auto_resume:
            Run.check_new(run_dir)
        args += [str(config), *[a for s in set_ for a in ("--set", s)], "--out", str(run_dir)]
    start_ranks(args, nproc, timeout, run_dir)


def start_ranks(args: list[str], nproc: int, timeout: float | None, run_dir: Path | None = None, *,
                trains: bool = True) -> None:
    """Run ``mtml <args>`` as ``nproc`` local ranks (see :func:`mtml.engine.launch`); ``trains``: the
    workers build ``torch.optim`` optimisers, whose imports the launcher then makes once for all of them."""
    from mtml.cli._app import main
    from mtml.engine import OPTIMIZER_IMPORTS, launch

    _check_launch(timeout)
    launch(args, nproc, run_dir=run_dir, timeout=timeout, entry=main, preload=OPTIMIZER_IMPORTS if trains else ())


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
    from mtml.workflows import evaluate_run

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
        start_ranks(["eval", str(run), "--split", split,
                     *[a for name, value in given if value is not None for a in (name, str(value))]], nproc,
                    dist_timeout, trains=False)
        return
    scores = evaluate_run(run, split, num_tasks=tasks, shots=shots, steps=steps)
    if prints():
        _print_scores(scores, f"{run} — {split}")
        interim = _interim(run)
        if interim:
            err_console.print(f"[yellow]note:[/] {escape(interim)}", highlight=False)


def _interim(path: Path) -> str | None:
    """Why a run's best checkpoint is not its final one (still training, interrupted, failed), or None."""
    from mtml.engine import Run
    from mtml.errors import RunExistsError

    run = Run.open(path)
    status = run.status().get("status")
    try:
        run.check_unlocked()
    except RunExistsError:
        return (f"{path} is still being trained by another process: these are the scores of its best checkpoint "
                "so far, not the run's final ones.")
    if status in ("completed", None):
        return None
    return (f"{path} is {status}, not completed: these are the scores of its best checkpoint so far; continue it "
            f"with `mtml train --resume {path}` for the final ones.")


def sweep(
    config: Annotated[Path | None, typer.Argument(help="YAML config file to search around")] = None,
    param: Annotated[list[str] | None, typer.Option(help="a swept key: training.lr=log:1e-4:1e-2, "
                                                        "model.options.trunk_hidden=choice:[[32],[64]], "
                                                        "int:LOW:HIGH[:STEP], float:LOW:HIGH[:STEP]")] = None,
    trials: Annotated[int | None, typer.Option(help="trials in all (default 20; a continued sweep may change it)")]
    = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="fix a key for every trial")] = None,
    out: Annotated[Path | None, typer.Option(help="the sweep's folder (default: sweeps/<name>-<time>); one that "
                                                  "holds this sweep is continued")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this sweep folder with its own sweep.json")] = None,
    nproc: Annotated[int, typer.Option(help="trials trained at once (worker processes sharing the cores)")] = 1,
    prune: Annotated[bool, typer.Option(help="stop trials whose validation objective is worse than the median "
                                             "of earlier trials at the same step")] = True,
    seed: Annotated[int | None, typer.Option(help="the sampler's seed (default: the config's seed)")] = None,
    quiet: Annotated[bool, typer.Option(help="no line per trial")] = False,
) -> None:
    """Search hyperparameters on Optuna: one run directory per trial, resumable after a kill, trials in
    parallel with --nproc, pruning on the validation objective; a table of the trials and plots at the end."""
    from mtml.workflows import sweep as run_sweep

    result = run_sweep(config, param or [], trials=trials, out=out, overrides=set_ or [], nproc=nproc,
                       prune=prune, seed=seed, resume=resume, announce=None if quiet else console.print)
    _print_sweep(result)


def _print_sweep(result: object) -> None:
    from rich.table import Table

    from mtml.workflows import SweepResult

    assert isinstance(result, SweepResult)
    rows = sorted(result.trials, key=lambda r: (r["state"] != "complete", r["value"] if r["value"] is not None
                                                else float("inf")))
    keys = [k for k in (rows[0] if rows else {}) if k not in ("trial", "state", "value", "best_step", "steps",
                                                               "seconds", "run", "error")]
    table = Table(title=f"sweep {result.path}: {len(rows)} trials (best validation objective, lower is better)")
    for head in ("trial", "state", "objective", *(k.rsplit(".", 1)[-1] for k in keys), "best step", "run"):
        table.add_column(head, justify="left" if head in ("state", "run") else "right", no_wrap=head == "run")
    for r in rows:
        best = result.best is not None and r["trial"] == result.best["trial"]
        cells = [str(r["trial"]), r["state"], "—" if r["value"] is None else f"{r['value']:.5g}",
                 *(f"{r[k]:.4g}" if isinstance(r[k], float) else json.dumps(r[k]) for k in keys),
                 str(r["best_step"] if r["best_step"] is not None else "—"), r["run"]]
        table.add_row(*cells, style="bold green" if best else None)
    console.print(table)
    if result.best is not None:
        console.print(f"best: trial {result.best['trial']} ({result.path / result.best['run']}); "
                      f"report: mtml report {result.path}")
    else:
        console.print(f"no trial completed yet; continue with: mtml sweep --resume {result.path}")
