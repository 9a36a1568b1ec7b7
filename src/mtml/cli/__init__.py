"""The ``mtml`` command line. Every command is a thin call of a public library function.

The commands live in :mod:`mtml.cli.runs` (train, eval), :mod:`mtml.cli.info` (list, demo) and
:mod:`mtml.cli.transfer` (affinity, rank, transfer), and are registered on :data:`app` below, in the order
``mtml --help`` shows them.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from mtml.cli import info, runs, transfer
from mtml.cli.app import app, console, err_console, prints
from mtml.errors import MtmlError

__all__ = ["INTERRUPTED", "app", "console", "err_console", "main"]

INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT)

for _command, _name in ((runs.train, "train"), (runs.eval_, "eval"), (info.list_, "list"), (info.demo, "demo"),
                        (transfer.affinity, "affinity"), (transfer.rank, "rank"), (transfer.transfer_, "transfer")):
    app.command(_name)(_command)


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
    if "MTML_LAUNCHED" not in os.environ and prints():
        err_console.print("interrupted. Continue a run with: mtml train --resume RUN")
    sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
