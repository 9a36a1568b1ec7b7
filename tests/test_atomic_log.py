"""metrics.jsonl after a crash: a torn last line is cut off instead of swallowing the next record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtml.atomic import append_jsonl


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("torn", ['{"kind":"step","st', "{", '{"a": 1}'])
def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path: Path, torn: str) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"kind": "step", "step": 1})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(torn)  # a crash in the middle of a write: no final newline
    append_jsonl(path, {"kind": "resume", "step": 1})
    assert _lines(path) == [{"kind": "step", "step": 1}, {"kind": "resume", "step": 1}]


def test_a_log_that_is_one_torn_line_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind":"st' * 10_000)  # longer than one read chunk, no newline at all
    append_jsonl(path, {"kind": "start"})
    assert _lines(path) == [{"kind": "start"}]


def test_whole_lines_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for step in range(3):
        append_jsonl(path, {"step": step})
    assert _lines(path) == [{"step": 0}, {"step": 1}, {"step": 2}]
