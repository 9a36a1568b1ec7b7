"""The ``mtml`` command line. Every command is a thin call of a public library function (:mod:`mtml.workflows`).

The commands live in :mod:`mtml.cli._runs` (train, eval, sweep), :mod:`mtml.cli._info` (list, demo, report, export) and
:mod:`mtml.cli._transfer` (affinity, rank, transfer), :mod:`mtml.cli._adapt` (adapt), and are registered on
:data:`app` below, in the order ``mtml --help`` shows them; :func:`main` (in :mod:`mtml.cli._app`) runs it.
"""

from __future__ import annotations

from mtml.cli import _adapt as adapt
from mtml.cli import _info as info
from mtml.cli import _runs as runs
from mtml.cli import _transfer as transfer
from mtml.cli._app import INTERRUPTED, app, console, err_console, main

__all__ = ["INTERRUPTED", "app", "console", "err_console", "main"]

for _command, _name in ((runs.train, "train"), (runs.eval_, "eval"), (info.list_, "list"), (info.demo, "demo"),
                        (transfer.affinity, "affinity"), (transfer.rank, "rank"), (transfer.transfer_, "transfer"),
                        (adapt.adapt_, "adapt"),
                        (runs.sweep, "sweep"), (info.report, "report"), (info.export, "export")):
    app.command(_name)(_command)


if __name__ == "__main__":
    main()
