"""The typer application and the consoles every command prints to."""

from __future__ import annotations

import os

import typer
from rich.console import Console

__all__ = ["app", "console", "err_console", "prints"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mtml: multi-task learning, meta-learning and knowledge transfer on PyTorch.")
console = Console()
err_console = Console(stderr=True)


def prints() -> bool:
    """Whether this process shows results: a plain process, or rank 0 under torchrun / ``--nproc`` (the
    process group is already closed when a command prints, so this reads the environment)."""
    return os.environ.get("RANK", "0") == "0"
