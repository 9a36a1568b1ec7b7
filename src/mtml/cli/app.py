"""The typer application and the consoles every command prints to."""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["app", "console", "err_console"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mtml: multi-task learning, meta-learning and knowledge transfer on PyTorch.")
console = Console()
err_console = Console(stderr=True)
