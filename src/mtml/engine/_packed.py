"""Packed rows: many tasks with rows of their own (one task per school, store, subject) as one batch.

With thousands of such tasks, a step that handles each task's rows on its own spends its time in Python, once per
task: a draw, two gathers, a trunk block, a head call, a loss call. A :class:`RowPack` holds the train rows of
every own-row task of one shape concatenated once, with each row's owner; a batch draws from all of them with one
random key per row, runs one trunk pass and one stacked head product, and reduces the per-row losses into per-task
means with one segmented sum. The result is the per-task path's, up to floating-point summation order (an oracle
test checks it and asserts which path ran). Switch: ``mtml.meta.speed_paths(packed_rows=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.groups import task_groups
from mtml.metrics import default_metrics
from mtml.tasks import Task, TaskKind

__all__ = ["PackedBatch", "RowPack", "RowPool", "packed_losses", "row_pools"]

#: a pool needs at least this many tasks: below it the per-task path costs little (and small task sets keep
#: the per-task draw, whose random stream earlier results were measured with)
MIN_TASKS = 32


@dataclass(frozen=True, eq=False)
class RowPack:
    """One drawn batch of a pool: ``x [rows, *input]``, ``y``, ``mask`` (or None) concatenated task after task,
    ``sizes`` rows per task (in ``names`` order) and ``owner [rows]``, each row's position in ``names``."""

    names: tuple[str, ...]
    x: Tensor
    y: Tensor
    mask: Tensor | None
    sizes: list[int]
    owner: Tensor


class PackedBatch(dict[str, tuple[Tensor, ...]]):
    """A batch ``{task: (x, y[, mask])}`` whose own-row tasks were also drawn as :class:`RowPack` s (``packs``).

    Every entry is a view into its pack, so a consumer that reads entries one by one sees an ordinary batch; a
    plain ``dict`` made from it (a rank's share, a subset of tasks) is an ordinary batch and takes the per-task
    path.
    """

    packs: list[RowPack]


class RowPool:
    """The train rows of own-row tasks that agree in input shape, target shape, dtypes and masking, concatenated
    once (a copy of their train split)."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.names = tuple(t.name for t in tasks)
        splits = [t.train for t in tasks]
        self.x = torch.cat([s.x for s in splits])
        self.y = torch.cat([s.y for s in splits])
        masks = [s.mask for s in splits]
        self.mask = None if masks[0] is None else torch.cat([m for m in masks if m is not None])
        self.counts = [len(s) for s in splits]
        counts = torch.tensor(self.counts, device=self.x.device)
        self.owner = torch.repeat_interleave(torch.arange(len(splits), device=self.x.device), counts)
        self.starts = torch.cumsum(counts, 0) - counts
        #: the batch entries when every task's rows fit in a batch: the tasks' own tensors
        self.whole: dict[str, tuple[Tensor, ...]] = {
            t.name: (s.x, s.y) if s.mask is None else (s.x, s.y, s.mask) for t, s in zip(tasks, splits, strict=True)
        }

    def entries(self, pack: RowPack) -> dict[str, tuple[Tensor, ...]]:
        """``{task: (x, y[, mask])}`` of a drawn ``pack``: views into it (the tasks' own tensors when it holds every
        row)."""
        if pack.x is self.x:
            return self.whole
        columns = [torch.split(pack.x, pack.sizes), torch.split(pack.y, pack.sizes)]
        if pack.mask is not None:
            columns.append(torch.split(pack.mask, pack.sizes))
        return dict(zip(pack.names, zip(*columns, strict=True), strict=True))

    def sample(self, batch_size: int, generator: torch.Generator) -> RowPack:
        """Every task's rows when it has at most ``batch_size``; else ``batch_size`` of them without replacement:
        the rows with the smallest of one uniform key per row (drawn from ``generator`` on the CPU)."""
        sizes = [min(c, batch_size) for c in self.counts]
        if sizes == self.counts:
            return RowPack(self.names, self.x, self.y, self.mask, sizes, self.owner)
        keys = torch.rand(self.x.shape[0], generator=generator, dtype=torch.float64).to(self.x.device)
        order = torch.argsort(self.owner.to(torch.float64) + keys)  # grouped by task, random within each task
        rank = torch.arange(order.numel(), device=order.device) - self.starts[self.owner]
        idx = order[rank < batch_size]  # rank is positional: sorted row j of task t sits at starts[t] + rank
        return RowPack(self.names, self.x[idx], self.y[idx], None if self.mask is None else self.mask[idx], sizes,
                       self.owner[idx])


def row_pools(tasks: Sequence[Task]) -> list[RowPool]:
    """Pools of the own-row tasks among ``tasks`` (tasks in a shared-row group stay out), one per input shape,
    target shape, dtypes, device and masking, each of at least :data:`MIN_TASKS` tasks."""
    buckets: dict[tuple[object, ...], list[Task]] = {}
    for group in task_groups(tasks):
        if group.shared:
            continue
        s = group.tasks[0].train
        key = (tuple(s.x.shape[1:]), s.x.dtype, s.x.device, tuple(s.y.shape[1:]), s.y.dtype, s.mask is None)
        buckets.setdefault(key, []).append(group.tasks[0])
    return [RowPool(members) for members in buckets.values() if len(members) >= MIN_TASKS]


def _row_losses(kind: TaskKind, pred: Tensor, y: Tensor) -> Tensor:
    """Per-row default loss ``[rows]`` of ``kind`` (each row's share of the task's mean loss, times rows)."""
    if kind is TaskKind.REGRESSION:
        return ((pred - y) ** 2).mean(1)
    if kind is TaskKind.MULTICLASS:
        return F.cross_entropy(pred, y, reduction="none")
    if kind is TaskKind.BINARY:
        return F.binary_cross_entropy_with_logits(pred.reshape(-1), y, reduction="none")
    return F.binary_cross_entropy_with_logits(pred, y, reduction="none").mean(1)


def packable(model: torch.nn.Module, tasks: Mapping[str, Task], names: Sequence[str]) -> bool:
    """Whether one pack of ``names`` can take the packed path: no stems, one kind, the default loss, one width."""
    stem_of = getattr(model, "stem_of", {})
    first = tasks[names[0]]
    return all(n not in stem_of and tasks[n].loss is None and tasks[n].kind is first.kind
               and tasks[n].num_outputs == first.num_outputs for n in names)


def packed_losses(model: torch.nn.Module, tasks: Mapping[str, Task], pack: RowPack) -> Tensor:
    """``[len(pack.names)]`` mean losses of the pack's tasks over their labelled rows, from one trunk pass, one
    stacked head product and one segmented sum (a task with no labelled row: an exact 0 that still depends on
    the prediction, as :meth:`~mtml.tasks.Task.compute_loss` gives)."""
    pred = model.forward_rows(pack.names, pack.x, pack.sizes, pack.owner)  # type: ignore[operator]
    per_row = _row_losses(tasks[pack.names[0]].kind, pred, pack.y)
    m = len(pack.names)
    if pack.mask is None:
        rows = torch.tensor(pack.sizes, dtype=per_row.dtype, device=per_row.device)
    else:
        per_row = torch.where(pack.mask, per_row, per_row * 0.0)
        rows = per_row.new_zeros(m).index_add(0, pack.owner, pack.mask.to(per_row.dtype))
    return per_row.new_zeros(m).index_add(0, pack.owner, per_row) / rows.clamp_min(1)


def pooled_chunks(model: torch.nn.Module, tasks: Sequence[Task], split: str, *,
                  max_rows: int = 8192) -> tuple[list[list[Task]], list[Task]]:
    """Own-row tasks of ``tasks`` that :meth:`~mtml.nn.MultiTaskModel.forward_rows` can score together on
    ``split`` — stem-less, in pools of at least :data:`MIN_TASKS` of one input shape — in chunks of at most
    ``max_rows`` rows (a bigger task is a chunk alone); and the tasks left for the per-group path."""
    if not hasattr(model, "forward_rows"):
        return [], list(tasks)
    stem_of = getattr(model, "stem_of", {})
    buckets: dict[tuple[object, ...], list[Task]] = {}
    rest: list[Task] = []
    for group in task_groups(tasks):
        task = group.tasks[0]
        if group.shared or task.name in stem_of:
            rest.extend(group.tasks)
            continue
        x = task.split(split).x
        buckets.setdefault((tuple(x.shape[1:]), x.dtype, x.device), []).append(task)
    chunks: list[list[Task]] = []
    for members in buckets.values():
        if len(members) < MIN_TASKS:
            rest.extend(members)
            continue
        chunk: list[Task] = []
        rows = 0
        for task in members:
            n = len(task.split(split))
            if chunk and rows + n > max_rows:
                chunks.append(chunk)
                chunk, rows = [], 0
            chunk.append(task)
            rows += n
        chunks.append(chunk)
    return chunks, rest


def chunk_scores(model: torch.nn.Module, chunk: Sequence[Task], split: str) -> dict[str, dict[str, float]]:
    """Every task's metrics (and ``loss``) of one chunk of :func:`pooled_chunks` on ``split``: outputs from one
    ``forward_rows`` call; metrics by segmented sums when every task has every row labelled, the default loss and
    the same metrics with a ``segmented`` form (regression's mse, mae, r2), else task by task."""
    parts = [t.split(split) for t in chunk]
    sizes = [len(p) for p in parts]
    names = [t.name for t in chunk]
    pred = model.forward_rows(names, torch.cat([p.x for p in parts]), sizes)  # type: ignore[operator]
    first = chunk[0]
    metrics = first.metrics
    same = all(t.kind is first.kind and t.loss is None and p.mask is None and len(p) > 0
               and t.metrics.keys() == metrics.keys()
               and all(t.metrics[k].fn is m.fn for k, m in metrics.items()) for t, p in zip(chunk, parts, strict=True))
    segmented = {k: m.segmented for k, m in metrics.items() if m.segmented is not None}
    if not (same and first.kind is TaskKind.REGRESSION and len(segmented) == len(metrics)):
        return {t.name: t.compute_metrics(out, p.y, p.mask)
                for t, p, out in zip(chunk, parts, torch.split(pred, sizes), strict=True)}
    y = torch.cat([p.y for p in parts])
    owner = torch.repeat_interleave(torch.arange(len(chunk), device=pred.device), torch.tensor(sizes,
                                                                                                device=pred.device))
    values = {k: fn(pred, y, owner, len(chunk)).tolist() for k, fn in segmented.items()}
    if "mse" in values:  # the default regression loss is the mean square
        loss = values["mse"]
    else:
        mse = default_metrics("regression")["mse"].segmented
        assert mse is not None
        loss = mse(pred, y, owner, len(chunk)).tolist()
    return {n: {**{k: v[i] for k, v in values.items()}, "loss": loss[i]} for i, n in enumerate(names)}
