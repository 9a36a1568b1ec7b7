"""Joint multi-task training: one step minimises Σᵢ wᵢ·Lᵢ over a mini-batch of every task."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtml.engine._packed import PackedBatch, RowPool, chunk_scores, packable, packed_losses, pooled_chunks, row_pools
from mtml.engine._precision import check_scalable
from mtml.errors import ConfigError
from mtml.groups import TaskGroup, task_groups
from mtml.meta import current_paths
from mtml.nn import MultiTaskModel
from mtml.tasks import Task, TaskKind
from mtml.weighting import BilevelWeighting, GramianTape, JacobianWeighting, Weighting, task_jacobian

__all__ = ["TaskBatcher", "bilevel_update", "evaluate", "joint_step", "objective", "predict", "predict_many",
           "task_losses"]

#: ``{task: (x, y)}``, or ``(x, y, mask)`` for a task with unlabelled rows (``mask: bool [rows]``, True =
#: labelled). Tasks on shared rows get the very same ``x`` tensor, which the model runs through its trunk once.
Batch = dict[str, tuple[Tensor, ...]]


def unpack(entry: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, y, mask | None)`` of one batch entry (``(x, y)`` or ``(x, y, mask)``)."""
    if len(entry) == 2:
        return entry[0], entry[1], None
    return entry[0], entry[1], entry[2]


class TaskBatcher:
    """Draws one mini-batch per task group from its train split (the full split when it is smaller).

    Tasks on shared rows (a :class:`~mtml.groups.TaskGroup`) get one index draw and the same ``x`` tensor; a task
    with rows of its own gets its own draw. Sampling is without replacement within a batch and uses only
    ``generator``, so a checkpointed generator state reproduces the batch sequence exactly.

    Many tasks with rows of their own (at least :data:`~mtml.engine._packed.MIN_TASKS` of one shape) are drawn as
    one :class:`~mtml.engine._packed.RowPack` instead, with one key per row (the batch is then a
    :class:`~mtml.engine._packed.PackedBatch`); ``speed_paths(packed_rows=False)`` draws them one by one.
    ``split`` (default ``train``) names the split drawn from; other splits (the ``val`` batches of a
    :class:`~mtml.weighting.BilevelWeighting`) are always drawn task group by task group.
    """

    def __init__(self, tasks: Sequence[Task], batch_size: int, *, split: str = "train") -> None:
        if batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1. Got {batch_size}.")
        self.split = split
        self.tasks = list(tasks)
        self.groups = task_groups(self.tasks)
        self.batch_size = batch_size
        self._pools: list[RowPool] | None = None  # built when first drawn with the switch on
        self._pooled: set[str] = set()

    def sample(self, generator: torch.Generator) -> Batch:
        batch: Batch = {}
        pools: list[RowPool] = []
        pooled: set[str] = set()
        if current_paths().packed_rows and self.split == "train":
            if self._pools is None:
                self._pools = row_pools(self.tasks)
                self._pooled = {n for pool in self._pools for n in pool.names}
            pools, pooled = self._pools, self._pooled
        for group in self.groups:
            if group.tasks[0].name in pooled:
                continue
            x, n = group.x(self.split), group.rows(self.split)
            idx = None
            if n > self.batch_size:
                idx = torch.randperm(n, generator=generator)[: self.batch_size].to(x.device)
                x = x[idx]
            for t in group.tasks:
                s = t.split(self.split)
                y, mask = (s.y, s.mask) if idx is None else (s.y[idx], None if s.mask is None else s.mask[idx])
                batch[t.name] = (x, y) if mask is None else (x, y, mask)
        packs = []
        for pool in pools:
            pack = pool.sample(self.batch_size, generator)
            packs.append(pack)
            batch.update(pool.entries(pack))
        if not pools:
            return {t.name: batch[t.name] for t in self.tasks}
        out = PackedBatch((t.name, batch[t.name]) for t in self.tasks)
        out.packs = packs
        return out


@dataclass
class StepResult:
    loss: float
    task_losses: dict[str, float]
    weights: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return {"loss": self.loss, "task_losses": self.task_losses, "weights": self.weights}


def joint_step(
    model: MultiTaskModel,
    tasks: Mapping[str, Task],
    batch: Batch,
    weighting: Weighting,
    optimizer: torch.optim.Optimizer,
    *,
    gramian: str | None = None,
    val_batch: Batch | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimiser update of ``Σᵢ wᵢ·Lᵢ + weighting.penalty()`` on ``batch`` (``{task: (x, y)}``).

    The task order is ``weighting.task_names``. When the weighting needs it, the Gramian of per-task gradients
    over the shared parameters is computed first from the same forward pass, by the backend ``gramian``
    (default: the weighting's own ``gramian`` option, itself ``auto`` unless set; see
    :mod:`mtml.weighting._gramian`).

    ``val_batch`` (a batch of the ``val`` splits, for a :class:`~mtml.weighting.BilevelWeighting` only) first
    updates the weights: :func:`bilevel_update`.

    ``scaler`` (fp16): back-propagate ``scaler.scale(loss)``; the optimiser then sees scaled gradients, which the
    caller unscales before stepping (as :class:`~mtml.engine.Updater` does with a
    :class:`~mtml.engine.LossScaler`). Weightings that take per-task gradients are refused with one.
    """
    if val_batch is not None:
        bilevel_update(model, tasks, batch, val_batch, weighting, optimizer)
    if scaler is not None:
        check_scalable(weighting)
    if isinstance(weighting, JacobianWeighting):
        return jacobian_step(model, tasks, batch, weighting, optimizer, gramian=gramian)
    names = weighting.task_names
    gram, tape = None, None
    if weighting.needs_gramian:  # (the tape follows each task's inputs through forward_many: no packs)
        tape = GramianTape(model, gramian or str(getattr(weighting, "gramian", "auto")))
        with tape:
            losses = task_losses(model, tasks, dict(batch), names)
        gram = tape.gramian(losses, {n: batch[n][0] for n in names}, names)
    else:
        losses = task_losses(model, tasks, batch, names)
    w = weighting(losses, gram)
    total = (w * losses).sum() + weighting.penalty().to(losses)
    optimizer.zero_grad(set_to_none=True)
    if tape is not None:  # layer-wise Gramians already hold what the shared layers' gradient needs
        tape.backward(total, w, [p for group in optimizer.param_groups for p in group["params"]])
    else:
        (total if scaler is None else scaler.scale(total)).backward()
    optimizer.step()
    lv, wv = losses.detach().tolist(), w.detach().tolist()
    return StepResult(float(total.detach()), dict(zip(names, lv, strict=True)), dict(zip(names, wv, strict=True)))


def bilevel_update(model: MultiTaskModel, tasks: Mapping[str, Task], batch: Batch, val_batch: Batch,
                   weighting: Weighting, optimizer: torch.optim.Optimizer) -> None:
    """Let a :class:`~mtml.weighting.BilevelWeighting` update its weights from the training ``batch`` and
    ``val_batch`` (task losses by :func:`task_losses`, the learning rate of the optimiser's first group)."""
    if not isinstance(weighting, BilevelWeighting):
        raise TypeError(f"{type(weighting).__name__} learns nothing from validation batches; pass val_batch only "
                        "with a BilevelWeighting (e.g. auto_lambda).")
    names = weighting.task_names
    weighting.update(model, batch, val_batch, lambda b: task_losses(model, tasks, b, names),
                     float(optimizer.param_groups[0]["lr"]))


def jacobian_backend(weighting: JacobianWeighting, gramian: str | None, device: torch.device) -> str:
    """The ``task_jacobian`` backend: ``gramian`` when it is ``loop``/``batched``, else the weighting's own."""
    return gramian if gramian in ("loop", "batched") else weighting.backend(device)


def jacobian_step(
    model: MultiTaskModel,
    tasks: Mapping[str, Task],
    batch: Batch,
    weighting: JacobianWeighting,
    optimizer: torch.optim.Optimizer,
    *,
    gramian: str | None = None,
) -> StepResult:
    """:func:`joint_step` for a :class:`~mtml.weighting.JacobianWeighting`: the per-task gradients
    ``J [m, d]`` of the shared parameters (one backward per task, or one batched backward) go to
    ``weighting.combine``, whose update is written into the shared parameters' ``.grad``; every other parameter
    gets the gradient of ``Σ weights[i]·Lᵢ + penalty`` (its own task's loss, weighted)."""
    names = weighting.task_names
    losses = task_losses(model, tasks, batch, names)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    jac = task_jacobian(losses, shared, backend=jacobian_backend(weighting, gramian, losses.device))
    out = weighting.combine(losses, jac)
    total = (out.weights * losses).sum() + weighting.penalty().to(losses)
    optimizer.zero_grad(set_to_none=True)
    covered = {id(p) for p in shared}
    others = [p for group in optimizer.param_groups for p in group["params"]
              if p.requires_grad and id(p) not in covered]
    if others and total.requires_grad:
        torch.autograd.backward(total, inputs=others)
    weighting.write_update(shared, out.update)
    optimizer.step()
    lv, wv = losses.detach().tolist(), out.weights.tolist()
    return StepResult(float(total.detach()), dict(zip(names, lv, strict=True)), dict(zip(names, wv, strict=True)))


def task_losses(model: MultiTaskModel, tasks: Mapping[str, Task], batch: Batch, names: Sequence[str]) -> Tensor:
    """``[m]`` losses of ``names`` on ``batch``, from one :meth:`~MultiTaskModel.forward_many` pass (tasks given
    the same ``x`` tensor share one trunk pass); a task's loss covers its labelled rows only.

    A model with a ``training_losses(tasks, batch, names)`` method computes them itself (hierarchical heads).
    When every task is a regression with the default MSE loss and every row is labelled, the m losses come from
    one stacked (equal batches) or segmented reduction instead of m separate loss calls (same values; an oracle
    test checks it). Both are plain tensor ops, which the batched backward of a Gramian differentiates fast.
    """
    custom = getattr(model, "training_losses", None)
    if callable(custom):  # a model with its own objective (hierarchical heads: the marginal likelihood)
        out = custom(tasks, batch, names)
        assert isinstance(out, Tensor)
        return out
    packs = [p for p in getattr(batch, "packs", ()) if hasattr(model, "forward_rows") and packable(model, tasks,
                                                                                                    p.names)]
    wanted = set(names)
    packs = [p for p in packs if wanted.issuperset(p.names)]
    if packs:  # many own-row tasks: one trunk pass, one head product and one segmented sum per pack
        if len(packs) == 1 and packs[0].names == tuple(names):
            return packed_losses(model, tasks, packs[0])
        position = {n: i for i, n in enumerate(names)}
        parts = [(p.names, packed_losses(model, tasks, p)) for p in packs]
        done = {n for p in packs for n in p.names}
        rest = [n for n in names if n not in done]
        if rest:
            parts.append((tuple(rest), task_losses(model, tasks, {n: batch[n] for n in rest}, rest)))
        index = torch.tensor([position[n] for part, _ in parts for n in part], device=parts[0][1].device)
        values = torch.cat([v for _, v in parts])
        return values.new_zeros(len(names)).index_copy(0, index, values)
    outputs = model.forward_many({n: batch[n][0] for n in names})
    plain = all(tasks[n].kind is TaskKind.REGRESSION and tasks[n].loss is None and len(batch[n]) == 2
                for n in names)
    if not plain or len({tasks[n].num_outputs for n in names}) != 1:
        return torch.stack([tasks[n].compute_loss(outputs[n], *unpack(batch[n])[1:]) for n in names])
    if len({batch[n][1].shape[0] for n in names}) == 1:  # equal batches (shared rows): one stacked reduction
        pred = torch.stack([outputs[n] for n in names])
        return ((pred - torch.stack([batch[n][1] for n in names])) ** 2).mean((1, 2))
    pred = torch.cat([outputs[n] for n in names])
    target = torch.cat([batch[n][1] for n in names])
    sizes = torch.tensor([batch[n][1].shape[0] for n in names], device=pred.device)
    owner = torch.repeat_interleave(torch.arange(len(names), device=pred.device), sizes)
    per_row = ((pred - target) ** 2).mean(1)
    return torch.zeros(len(names), dtype=pred.dtype, device=pred.device).index_add(0, owner, per_row) / sizes


@torch.no_grad()
def predict(model: MultiTaskModel, task: str, x: Tensor, *, batch_size: int = 8192) -> Tensor:
    """Model outputs for ``x`` in chunks of ``batch_size`` (bounded memory on large splits)."""
    return torch.cat([model(x[i : i + batch_size], task) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def predict_many(model: MultiTaskModel, names: Sequence[str], x: Tensor, *,
                 batch_size: int = 8192) -> dict[str, Tensor]:
    """Outputs of every task in ``names`` for the same rows ``x``: one trunk pass per chunk of ``batch_size``."""
    chunks = [model.forward_many(dict.fromkeys(names, x[i : i + batch_size])) for i in range(0, x.shape[0],
                                                                                            batch_size)]
    return {n: torch.cat([c[n] for c in chunks]) for n in names}


def evaluate(model: MultiTaskModel, tasks: Sequence[Task], split: str = "val", *,
             map_fn: Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]] | None = None,
             ) -> dict[str, dict[str, float]]:
    """Per-task metrics (and ``loss``) of ``model`` on ``split``: ``{task: {metric: value}}``, each over the
    task's labelled rows. Tasks on shared rows are scored from one trunk pass.

    ``map_fn`` maps the scoring over task groups; default a plain loop in this process, so calling it on one
    rank of your own process group is safe. mtml's training passes :func:`~mtml.engine.map_ranks` (every rank
    calls it; the groups are spread over the ranks and every rank gets all metrics).
    """
    refit = getattr(model, "refit", None)
    if callable(refit):  # heads fitted in closed form from each task's training rows (hierarchical heads)
        refit(tasks)
    was_training = model.training
    model.eval()
    try:
        def score(item: TaskGroup | list[Task]) -> dict[str, dict[str, float]]:
            if isinstance(item, list):  # a chunk of many own-row tasks: one forward_rows call
                return chunk_scores(model, item, split)
            out = predict_many(model, [t.name for t in item.tasks], item.x(split))
            return {t.name: t.compute_metrics(out[t.name], t.split(split).y, t.split(split).mask) for t in item.tasks}

        chunks: list[list[Task]] = []
        rest = list(tasks)
        if current_paths().packed_rows:
            chunks, rest = pooled_chunks(model, tasks, split)
        scores: dict[str, dict[str, float]] = {}
        items: list[TaskGroup | list[Task]] = [*chunks, *task_groups(rest)]
        for part in (map_fn or _plain_map)(score, items):
            scores.update(part)
        return {t.name: scores[t.name] for t in tasks}
    finally:
        model.train(was_training)


def _plain_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    return [fn(x) for x in items]


def objective(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The validation objective of joint training: the mean over tasks of the task losses."""
    return float(sum(m["loss"] for m in metrics.values()) / len(metrics))
