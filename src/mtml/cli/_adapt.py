"""``mtml adapt``: unsupervised domain adaptation of a run to a target config's shifted domain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtml.cli._app import console, prints


def adapt_(
    run: Annotated[Path, typer.Argument(help="source run directory (a joint run; its train rows are the source)")],
    target: Annotated[Path, typer.Option(help="YAML config of the target domain: train rows unlabelled, test scored")],
    methods: Annotated[str | None, typer.Option(help="comma-separated methods: dann,cdan,mcc,mdd (default: all)")]
    = None,
    seeds: Annotated[int, typer.Option(help="adaptation seeds per method")] = 3,
    seed: Annotated[int, typer.Option(help="first seed")] = 0,
    option: Annotated[list[str] | None, typer.Option(help="method option: --option mcc.temperature=2")] = None,
    upper_bound: Annotated[bool, typer.Option(help="also fit the target-supervised upper bound")] = True,
    out: Annotated[Path | None, typer.Option(help="output directory (default: RUN/adapt-<target>-<time>)")] = None,
) -> None:
    """Adapt a run to a --target domain with DANN, CDAN+E, MCC and MDD; target accuracy vs source-only, with CIs."""
    import time

    from mtml.cli._transfer import parse_options
    from mtml.workflows import adapt

    options = parse_options(option, "METHOD", "mcc.temperature=2")
    out = out or run / f"adapt-{target.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not prints():
        adapt(run, target, methods=methods, seeds=seeds, seed=seed, options=options, upper_bound=upper_bound, out=out)
        return
    with console.status("adapting…"):
        result = adapt(run, target, methods=methods, seeds=seeds, seed=seed, options=options,
                       upper_bound=upper_bound, out=out)
    console.print(result.markdown(), markup=False, highlight=False)
    console.print(f"written to [bold]{out}[/] (adapt.json, adapt.md)")
