"""Task groups: tasks on the same rows (several targets of one table, several heads on the same images).

A group holds ``x`` once per split, one target column per task and, where labels are missing, a per-task row
mask (see :class:`~mtml.tasks.Split`). Tasks declare their group by name (``Task.group``); tasks whose splits
hold the very same ``x`` tensors form a group too, unnamed. Everything that batches or evaluates tasks asks
:func:`task_groups` which tasks share rows, so that one index draw and one trunk pass serve the whole group.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtml.errors import DataError
from mtml.tasks import SPLITS, Split, Task

__all__ = ["TaskGroup", "labelled_only", "task_groups", "tasks_to"]


@dataclass(frozen=True)
class TaskGroup:
    """Tasks over the same rows (``shared``), or one task with rows of its own."""

    name: str
    tasks: tuple[Task, ...]

    @property
    def shared(self) -> bool:
        return len(self.tasks) > 1

    def x(self, split: str) -> Tensor:
        """The group's inputs of ``split`` (the first task's tensor; every task holds equal values)."""
        return self.tasks[0].split(split).x

    def rows(self, split: str) -> int:
        return len(self.tasks[0].split(split))


def _key(task: Task) -> tuple[object, ...]:
    if task.group is not None:
        return ("named", task.group)
    ids = tuple(id(s.x) if s is not None else None for s in (task.train, task.val, task.test))
    return ("same-x", *ids)


def task_groups(tasks: Sequence[Task]) -> list[TaskGroup]:
    """The tasks by shared rows, in first-appearance order: each group's tasks keep their order.

    Tasks with the same ``group`` must have the same splits with the same number of rows and equal inputs;
    a :class:`~mtml.errors.DataError` names the two tasks and what differs. Tasks without a group share rows
    exactly when every split holds the same ``x`` tensor object.
    """
    order: dict[tuple[object, ...], list[Task]] = {}
    for task in tasks:
        order.setdefault(_key(task), []).append(task)
    groups = []
    for key, members in order.items():
        if key[0] == "named":
            _check_same_rows(str(key[1]), members)
        name = str(key[1]) if key[0] == "named" else (members[0].name if len(members) == 1 else
                                                       "+".join(t.name for t in members))
        groups.append(TaskGroup(name, tuple(members)))
    return groups


def _check_same_rows(group: str, members: list[Task]) -> None:
    first = members[0]
    for other in members[1:]:
        for split in SPLITS:
            a, b = getattr(first, split), getattr(other, split)
            if (a is None) != (b is None):
                has, lacks = (first, other) if b is None else (other, first)
                raise DataError(f"tasks '{has.name}' and '{lacks.name}' share the rows of group '{group}', but only "
                                f"'{has.name}' has a {split} split; give every task of a group the same splits.")
            if a is None or b is None or a.x is b.x:
                continue
            if a.x.shape != b.x.shape:
                raise DataError(f"tasks '{first.name}' and '{other.name}' share the rows of group '{group}', but "
                                f"their {split} splits have {len(a)} and {len(b)} rows ({tuple(a.x.shape)} vs "
                                f"{tuple(b.x.shape)}); tasks on shared rows need one row per example in every "
                                "task. Mark missing labels with Split(mask=...) instead of dropping rows.")
            if a.x.device != b.x.device or not torch.equal(a.x, b.x):
                raise DataError(f"tasks '{first.name}' and '{other.name}' share the rows of group '{group}', but "
                                f"their {split} inputs differ; give both tasks the same x tensor, or different "
                                "groups.")


def _with_splits(task: Task, splits: dict[str, Split], **fields: object) -> Task:
    """A copy of ``task`` with some splits (and fields) replaced, not validated again (as :meth:`Task.to`)."""
    out = copy.copy(task)
    for name, value in {**splits, **fields}.items():
        object.__setattr__(out, name, value)
    return out


def tasks_to(tasks: Sequence[Task], device: torch.device | str) -> list[Task]:
    """Every task moved to ``device``; tensors shared between tasks stay shared (moved once)."""
    moved: dict[int, Tensor] = {}

    def move(t: Tensor) -> Tensor:
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    return [_with_splits(task, {name: Split(move(s.x), move(s.y), None if s.mask is None else move(s.mask))
                                for name in SPLITS if (s := getattr(task, name)) is not None})
            for task in tasks]


def labelled_only(task: Task) -> Task:
    """``task`` with its unlabelled rows dropped from every split (for uses that train or score one task alone,
    such as transfer targets); the task itself when every row has a label."""
    masked = {name: s for name in SPLITS if (s := getattr(task, name)) is not None and s.mask is not None}
    if not masked:
        return task
    return _with_splits(task, {name: Split(s.x[s.mask], s.y[s.mask]) for name, s in masked.items()}, group=None)
