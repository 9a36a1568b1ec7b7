"""Joint multi-task training: one step minimises Σᵢ wᵢ·Lᵢ over a mini-batch of every task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtml.engine.distributed import map_ranks
from mtml.errors import ConfigError
from mtml.nn.model import MultiTaskModel
from mtml.tasks import Task, TaskKind
from mtml.weighting import GramianTape, Weighting

__all__ = ["TaskBatcher", "evaluate", "joint_step", "objective", "predict", "task_losses"]

Batch = dict[str, tuple[Tensor, Tensor]]


class TaskBatcher:
    """Draws one mini-batch per task from its train split (full split when it is smaller than the batch).

    Sampling is without replacement within a batch and uses only ``generator``, so a checkpointed generator
    state reproduces the batch sequence exactly.
    """

    def __init__(self, tasks: Sequence[Task], batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1. Got {batch_size}.")
        self.tasks = list(tasks)
        self.batch_size = batch_size

    def sample(self, generator: torch.Generator) -> Batch:
        batch: Batch = {}
        for t in self.tasks:
            n = len(t.train)
            if n <= self.batch_size:
                batch[t.name] = (t.train.x, t.train.y)
                continue
            idx = torch.randperm(n, generator=generator)[: self.batch_size].to(t.train.x.device)
            batch[t.name] = (t.train.x[idx], t.train.y[idx])
        return batch


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
) -> StepResult:
    """One optimiser update of ``Σᵢ wᵢ·Lᵢ + weighting.penalty()`` on ``batch`` (``{task: (x, y)}``).

    The task order is ``weighting.task_names``. When the weighting needs it, the Gramian of per-task gradients
    over the shared parameters is computed first from the same forward pass, by the backend ``gramian``
    (default: the weighting's own ``gramian`` option, itself ``auto`` unless set; see
    :mod:`mtml.weighting.gramian`).
    """
    names = weighting.task_names
    gram = None
    if weighting.needs_gramian:
        tape = GramianTape(model, gramian or str(getattr(weighting, "gramian", "auto")))
        with tape:
            losses = task_losses(model, tasks, batch, names)
        gram = tape.gramian(losses, {n: batch[n][0] for n in names}, names)
    else:
        losses = task_losses(model, tasks, batch, names)
    w = weighting(losses, gram)
    total = (w * losses).sum() + weighting.penalty().to(losses)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    lv, wv = losses.detach().tolist(), w.detach().tolist()
    return StepResult(float(total.detach()), dict(zip(names, lv, strict=True)), dict(zip(names, wv, strict=True)))


def task_losses(model: MultiTaskModel, tasks: Mapping[str, Task], batch: Batch, names: Sequence[str]) -> Tensor:
    """``[m]`` losses of ``names`` on ``batch``, from one :meth:`~MultiTaskModel.forward_many` pass.

    When every task is a regression with the default MSE loss, the m losses come from one segmented
    reduction instead of m separate loss calls (same values; an oracle test checks it).
    """
    outputs = model.forward_many({n: batch[n][0] for n in names})
    plain = all(tasks[n].kind is TaskKind.REGRESSION and tasks[n].loss is None for n in names)
    if not plain or len({tasks[n].num_outputs for n in names}) != 1:
        return torch.stack([tasks[n].compute_loss(outputs[n], batch[n][1]) for n in names])
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


def evaluate(model: MultiTaskModel, tasks: Sequence[Task], split: str = "val") -> dict[str, dict[str, float]]:
    """Per-task metrics (and ``loss``) of ``model`` on ``split``: ``{task: {metric: value}}``.

    In a process group the tasks are spread over the ranks and every rank gets all metrics.
    """
    was_training = model.training
    model.eval()
    try:
        def score(t: Task) -> dict[str, float]:
            s = t.split(split)
            return t.compute_metrics(predict(model, t.name, s.x), s.y)

        return dict(zip([t.name for t in tasks], map_ranks(score, tasks), strict=True))
    finally:
        model.train(was_training)


def objective(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The validation objective of joint training: the mean over tasks of the task losses."""
    return float(sum(m["loss"] for m in metrics.values()) / len(metrics))
