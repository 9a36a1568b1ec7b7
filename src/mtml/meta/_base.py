"""The meta-algorithm interface.

A meta-algorithm turns a support split into task-specific state (:meth:`MetaAlgorithm.adapt`), predicts the
query split from that state (:meth:`MetaAlgorithm.predict`) and exposes the outer objective whose gradient
updates the meta-learner (:meth:`MetaAlgorithm.meta_objective`). Everything is vectorised over the tasks of an
:class:`~mtml.meta._episode.Episode`. Algorithms are ``nn.Module`` s so that learned state (Meta-SGD's rates,
the ridge head's regulariser and scale) lives in parameters that optimisers and checkpoints see.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtml.meta._episode import Episode, episode_losses, task_accuracy, way_logits
from mtml.tasks import Split

__all__ = ["MetaAlgorithm", "MetaOutput", "Scores"]

Scores = dict[str, Tensor]
"""Per-task metrics of one episode: ``{"loss": [tasks]}``, plus ``"accuracy"`` for classification."""


@dataclass(frozen=True)
class MetaOutput:
    """What one episode gives the outer loop.

    Attributes:
        objective: scalar whose gradient with respect to the meta-parameters is the meta-gradient.
        losses: ``[tasks]`` query loss of each task after adaptation (detached).
        accuracy: ``[tasks]`` query accuracy for classification episodes, else ``None``.
    """

    objective: Tensor
    losses: Tensor
    accuracy: Tensor | None = None


class MetaAlgorithm(nn.Module):
    """Base class: adapt on support, predict the query, meta-learn from the query loss.

    Subclasses implement :meth:`adapt` and :meth:`predict`; gradient-based ones set ``uses_inner_steps`` and
    override :meth:`evaluate` to score the query after several step counts in one pass.
    """

    uses_inner_steps: ClassVar[bool] = False
    test_inner_steps: int = 0

    @abstractmethod
    def adapt(self, model: nn.Module, support: Split, *, ways: int = 0, train: bool = True) -> Any:
        """Task-specific state from ``support`` (``x: [tasks, shots, ...]``), differentiable when ``train``.

        ``train`` also selects the training (rather than test-time) inner-loop settings.
        """

    @abstractmethod
    def predict(self, model: nn.Module, adapted: Any, x: Tensor) -> Tensor:
        """Outputs ``[tasks, n, outputs]`` for ``x: [tasks, n, *input]`` from the adapted state."""

    def meta_objective(self, model: nn.Module, episode: Episode) -> MetaOutput:
        """Mean query loss over the tasks after adapting on their support sets (differentiable)."""
        self.check_episode(episode)
        adapted = self.adapt(model, episode.support, ways=episode.ways, train=True)
        pred = way_logits(self.predict(model, adapted, episode.query.x), episode.query.y, episode.ways)
        losses = episode_losses(pred, episode.query.y)
        return MetaOutput(losses.mean(), losses.detach(), self._accuracy(pred, episode))

    def evaluate(self, model: nn.Module, episode: Episode, steps: Sequence[int]) -> dict[int, Scores]:
        """Per-task query metrics ``{steps: {"loss": [tasks], "accuracy": [tasks]}}`` for each step count.

        Closed-form algorithms adapt exactly, so their scores do not depend on ``steps``.
        """
        self.check_episode(episode)
        with torch.no_grad():
            adapted = self.adapt(model, episode.support, ways=episode.ways, train=False)
            scores = self.score(self.predict(model, adapted, episode.query.x), episode)
        return {s: scores for s in steps}

    def backward_chunk(self, episode: Episode) -> int:
        """Tasks per backward pass in :func:`~mtml.meta.meta_step` (default: all of them in one).

        The meta-objective is a mean over tasks, so back-propagating it chunk by chunk (each chunk's objective
        scaled by its share of the tasks) gives the same gradient while holding one chunk's graph at a time.
        """
        return episode.num_tasks

    def check_episode(self, episode: Episode) -> None:
        """Raise :class:`ConfigError` when this algorithm cannot handle ``episode`` (kind, shots)."""

    def score(self, pred: Tensor, episode: Episode) -> dict[str, Tensor]:
        """``{"loss": [tasks]}`` plus ``"accuracy"`` for classification, from query predictions (logits beyond the
        episode's ways, of a head with more outputs, left out: :func:`~mtml.meta._episode.way_logits`)."""
        pred = way_logits(pred, episode.query.y, episode.ways)
        out = {"loss": episode_losses(pred, episode.query.y)}
        accuracy = self._accuracy(pred, episode)
        if accuracy is not None:
            out["accuracy"] = accuracy
        return out

    @staticmethod
    def _accuracy(pred: Tensor, episode: Episode) -> Tensor | None:
        if not episode.is_classification:
            return None
        with torch.no_grad():
            return task_accuracy(way_logits(pred, episode.query.y, episode.ways), episode.query.y)
