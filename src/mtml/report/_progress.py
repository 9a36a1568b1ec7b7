"""A rich progress bar for :func:`mtml.engine._fit`: step, loss, per-task losses, best validation, ETA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["RichProgress"]


class RichProgress:
    """Shows training progress; with many tasks the per-task losses collapse to their mean and max."""

    def __init__(self, description: str = "train", console: Console | None = None, max_tasks_shown: int = 4) -> None:
        self.description = description
        self.max_tasks_shown = max_tasks_shown
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self._id: Any = None

    def start(self, total: int, completed: int) -> None:
        self._progress.start()
        self._id = self._progress.add_task(self.description, total=total, completed=completed, info="")

    def update(self, step: int, info: Mapping[str, Any]) -> None:
        if step % 5 and "val" not in info:
            return
        self._progress.update(self._id, completed=step, info=self._format(info))

    def stop(self) -> None:
        self._progress.stop()

    def _format(self, info: Mapping[str, Any]) -> str:
        parts = [f"loss {info.get('loss', float('nan')):.4g}"]
        task_losses = info.get("task_losses") or {}
        if 0 < len(task_losses) <= self.max_tasks_shown:
            parts += [f"{k} {v:.3g}" for k, v in task_losses.items()]
        elif task_losses:
            values = list(task_losses.values())
            parts.append(f"{len(values)} tasks: mean {sum(values) / len(values):.3g} max {max(values):.3g}")
        best = info.get("best")
        if best is not None and best != float("inf"):
            parts.append(f"best val {best:.4g}")
        return " · ".join(parts)
