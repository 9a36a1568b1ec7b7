"""Episodes: a batch of tasks, each with a support and a query split, stacked as ``[tasks, shots, ...]``.

Targets decide the kind of every task in an episode: floating-point ``y: [tasks, shots, outputs]`` is
regression (mean squared error), integer ``y: [tasks, shots]`` holding labels ``0..ways-1`` is classification
(cross-entropy on ``[tasks, shots, ways]`` logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from mtml.errors import ShapeError
from mtml.tasks import Split

__all__ = ["Episode", "EpisodeSampler", "episode_losses", "mean_task_loss", "task_accuracy", "way_logits"]


@dataclass(frozen=True)
class Episode:
    """``support`` and ``query`` splits of ``tasks`` tasks, stacked along a leading task dimension.

    Args:
        support: ``x: [tasks, shots, *input]``, ``y: [tasks, shots, outputs]`` (regression) or
            ``[tasks, shots]`` integer labels (classification).
        query: the same layout with ``query_shots`` examples per task.
        ways: classes per task for classification (labels lie in ``[0, ways)``); 0 for regression.
        classes: optional ``[tasks, ways]`` integer tensor: ``classes[t, k]`` is the global id (an index into
            the sampler's class list, ``0..num_classes-1``) of the class that task ``t`` labels ``k``; ``None``
            when the sampler does not know it (regression, episodes built by hand).
    """

    support: Split
    query: Split
    ways: int = 0
    classes: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("support", "query"):
            s = getattr(self, name)
            if s.x.ndim < 3 or s.y.shape[:2] != s.x.shape[:2]:
                raise ShapeError(
                    f"episode {name}: x must be [tasks, shots, *input] and y [tasks, shots, ...] with the "
                    f"same two leading sizes; got x {tuple(s.x.shape)} and y {tuple(s.y.shape)}."
                )
            if s.y.is_floating_point() and s.y.ndim == 2:
                object.__setattr__(self, name, Split(s.x, s.y.unsqueeze(-1)))
        if self.support.x.shape[0] != self.query.x.shape[0]:
            raise ShapeError(f"episode: support has {self.support.x.shape[0]} tasks but query has "
                             f"{self.query.x.shape[0]}; stack the same tasks in both.")
        if self.support.y.is_floating_point() != self.query.y.is_floating_point():
            raise ShapeError("episode: support and query targets must both be float (regression) or both "
                             "integer labels (classification).")
        if self.is_classification and self.ways <= 0:
            raise ShapeError(f"episode: integer labels need `ways` > 0 (classes per task). Got {self.ways}.")
        if self.classes is not None and (self.classes.is_floating_point()
                                         or tuple(self.classes.shape) != (self.num_tasks, self.ways)):
            raise ShapeError(f"episode: `classes` must be an integer tensor [tasks, ways] = "
                             f"[{self.num_tasks}, {self.ways}]; got {tuple(self.classes.shape)} "
                             f"({self.classes.dtype}). Pass None when the global classes are unknown.")

    @property
    def is_classification(self) -> bool:
        return not self.support.y.is_floating_point()

    @property
    def num_tasks(self) -> int:
        return int(self.support.x.shape[0])

    @property
    def shots(self) -> int:
        """Support examples per task."""
        return int(self.support.x.shape[1])

    def task(self, index: int) -> Episode:
        """The episode holding only task ``index`` (still with a leading task dimension of 1)."""
        return self.tasks(index, index + 1)

    def tasks(self, start: int, stop: int) -> Episode:
        """The episode holding tasks ``start`` to ``stop − 1`` (their support and query sets, views)."""
        pick = slice(start, stop)
        return Episode(Split(self.support.x[pick], self.support.y[pick]),
                       Split(self.query.x[pick], self.query.y[pick]), self.ways,
                       None if self.classes is None else self.classes[pick])

    def to(self, device: torch.device | str) -> Episode:
        return Episode(self.support.to(device), self.query.to(device), self.ways,
                       None if self.classes is None else self.classes.to(device))


@runtime_checkable
class EpisodeSampler(Protocol):
    """Anything that draws an :class:`Episode` from an explicit generator (see :mod:`mtml.sampling`)."""

    def sample(self, generator: torch.Generator) -> Episode: ...


def way_logits(pred: Tensor, y: Tensor, ways: int) -> Tensor:
    """The logits of an episode's ``ways`` classes: ``pred[..., :ways]`` when a classification head has more outputs
    than the episode has ways (variable-way episodes through a ``max_ways`` head), so that the unused classes do not
    enter the softmax; ``pred`` itself (the same tensor) for regression (float ``y``), ``ways`` 0 (unknown) or a head
    of exactly ``ways`` outputs.
    """
    if ways <= 0 or y.is_floating_point() or pred.shape[-1] == ways:
        return pred
    if pred.shape[-1] < ways:
        raise ShapeError(f"the episode has {ways} ways but the model gives {pred.shape[-1]} logits; build the head "
                         "with one output per way of the largest episode (model outputs >= max ways).")
    return pred[..., :ways]


def episode_losses(pred: Tensor, y: Tensor) -> Tensor:
    """Per-task loss ``[tasks]`` of ``pred`` against ``y`` (both ``[tasks, shots, ...]``).

    Float targets: mean squared error over shots and outputs. Integer targets: mean cross-entropy of the
    logits ``pred: [tasks, shots, ways]`` over shots.
    """
    if y.is_floating_point():
        return (pred - y).square().mean(dim=tuple(range(1, pred.ndim)))
    tasks, shots = y.shape
    losses = F.cross_entropy(pred.reshape(tasks * shots, -1), y.reshape(-1), reduction="none")
    return losses.view(tasks, shots).mean(1)


def mean_task_loss(pred: Tensor, y: Tensor) -> Tensor:
    """``episode_losses(pred, y).mean()`` as one fused loss call (every task has the same number of shots)."""
    if y.is_floating_point():
        return F.mse_loss(pred, y)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


def task_accuracy(pred: Tensor, y: Tensor) -> Tensor:
    """Per-task accuracy ``[tasks]`` of logits ``pred: [tasks, shots, ways]`` against labels ``y``."""
    return (pred.argmax(-1) == y).to(pred.dtype).mean(1)
