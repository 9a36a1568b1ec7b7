"""Reporting: learning-curve PNGs from metrics records, terminal tables."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mtml.report import comparison_table, metrics_table, plot_learning_curves


def _records(tasks: int, steps: int = 4) -> list[dict]:
    out: list[dict] = []
    for step in range(1, steps + 1):
        losses = {f"t{i}": 1.0 / (step + i) for i in range(tasks)}
        out.append({"kind": "train", "step": step, "task_losses": losses})
        out.append({"kind": "val", "step": step, "tasks": {k: {"loss": v, "mse": v} for k, v in losses.items()}})
    out.append({"kind": "resume", "step": 2})
    out.append({"kind": "train", "step": 3, "task_losses": {"t0": 0.1}})  # a resumed step overrides
    return out


def _render(table: object) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_learning_curves_panels_and_overlay(tmp_path: Path) -> None:
    for tasks in (1, 5, 20):
        out = tmp_path / str(tasks)
        paths = plot_learning_curves(_records(tasks), out)
        assert paths == [out / "learning_curves.png"]
        assert paths[0].read_bytes()[:4] == b"\x89PNG"
    assert plot_learning_curves([{"kind": "done", "step": 1}], tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def test_metrics_table_summarises_many_tasks() -> None:
    metrics = {f"task_{i}": {"mse": float(i), "r2": 0.5} for i in range(25)}
    text = _render(metrics_table(metrics, title="test", max_rows=20))
    assert "task_19" in text and "task_20" not in text
    assert "mean of all 25" in text and "12.0000" in text  # mean mse of 0..24


def test_comparison_table_marks_the_better_side() -> None:
    rows = [("a", "mse", 1.0, 2.0, False), ("b", "r2", 0.1, 0.3, True), ("c", "acc", 0.5, 0.5, True)]
    text = _render(comparison_table(rows, title="cmp", labels=("multi", "single")))
    lines = {line.split()[1]: line for line in text.splitlines() if line.strip().startswith(("│ a", "│ b", "│ c"))}
    assert lines["a"].rstrip(" │").endswith("multi")
    assert lines["b"].rstrip(" │").endswith("single")
    assert lines["c"].rstrip(" │").endswith("tie")
