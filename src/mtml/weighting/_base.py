"""The weighting interface: per-task losses (and optionally their gradient Gramian) → task weights."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError, ShapeError

__all__ = ["GRAMIAN_BACKENDS", "GramianWeighting", "Weighting"]

#: How the step computes the task Gramian (see :mod:`mtml.weighting._gramian`).
GRAMIAN_BACKENDS = ("auto", "loop", "batched", "layerwise", "rows", "representation")


class Weighting(nn.Module):
    """Turns per-task losses into task weights; the training objective is ``Σ wᵢ·Lᵢ + penalty()``.

    Subclasses implement :meth:`weights`. Methods that need the per-task gradients set ``needs_gramian = True``
    and receive ``gramian[i, j] = ⟨∇Lᵢ, ∇Lⱼ⟩`` over the shared parameters, computed by the step function in one
    pass. Learned or stateful weightings keep their state in parameters and buffers so checkpoints carry it.
    Returned weights are detached unless the method learns through them (uncertainty weighting does).

    Args:
        task_names: the tasks, in the order of the loss vector.
    """

    needs_gramian: ClassVar[bool] = False
    #: False for methods whose weights may be negative by design (IMTL-G, Aligned-MTL).
    nonnegative: ClassVar[bool] = True
    #: True for methods that draw random weights or orders (RLW, PCGrad, GradVac): identical tasks may then get
    #: different weights, and permuting tasks permutes the weights only in distribution.
    stochastic: ClassVar[bool] = False
    #: True when ``weights(P·losses, P·G·Pᵀ) = P·weights(losses, G)`` for every permutation P, without state.
    permutation_equivariant: ClassVar[bool] = False

    def __init__(self, task_names: Sequence[str], /) -> None:
        super().__init__()
        if len(task_names) == 0:
            raise ConfigError("a weighting needs at least one task.")
        self.task_names = list(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def forward(self, losses: Tensor, gramian: Tensor | None = None) -> Tensor:
        """``losses: [m]`` (and ``gramian: [m, m]``) → ``weights: [m]``."""
        m = self.num_tasks
        if losses.shape != (m,):
            raise ShapeError(f"{type(self).__name__}: expected losses of shape [{m}] (one per task), "
                             f"got {tuple(losses.shape)}.")
        if self.needs_gramian:
            if gramian is None:
                raise ValueError(f"{type(self).__name__} needs the Gramian of per-task gradients; pass gramian=.")
            if gramian.shape != (m, m):
                raise ShapeError(f"{type(self).__name__}: expected gramian [{m}, {m}], got {tuple(gramian.shape)}.")
        return self.weights(losses, gramian)

    @abstractmethod
    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        """The method itself: ``losses: [m]``, ``gramian: [m, m] | None`` → ``weights: [m]``."""

    def penalty(self) -> Tensor:
        """A term added to the weighted loss (learned weightings regularise their parameters here)."""
        return torch.zeros(())


class GramianWeighting(Weighting):
    """A weighting computed from the Gramian of per-task gradients (``needs_gramian = True``).

    Args:
        gramian: how the step computes the Gramian: ``auto`` (the fastest exact way for the model, see
            :mod:`mtml.weighting._gramian`), ``loop``, ``batched``, ``layerwise``, ``rows`` (layer-wise with one
            backward split by rows; needs every row read by one task and a trunk that keeps rows apart) or
            ``representation`` (gradients
            with respect to the shared representation instead of the shared parameters: cheaper, not exact).
    """

    needs_gramian: ClassVar[bool] = True

    def __init__(self, task_names: Sequence[str], /, *, gramian: str = "auto") -> None:
        super().__init__(task_names)
        if gramian not in GRAMIAN_BACKENDS:
            raise ConfigError(f"`gramian` must be one of {', '.join(GRAMIAN_BACKENDS)}. Got {gramian!r}.")
        self.gramian = gramian

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, gramian={self.gramian}"
