"""Coordinate-wise trimmed mean of the task gradients.

Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018 (as an aggregator of task gradients: TorchJD's ``TrimmedMean``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import JacobianUpdate, JacobianWeighting


class TrimmedMean(JacobianWeighting):
    """Per coordinate of the shared parameters, drop the ``trim`` largest and ``trim`` smallest task
    components and average the remaining ``m − 2·trim``: robust to a few tasks with outlying gradients.
    ``trim = 0`` is the mean gradient. Not a combination ``Σ wᵢgᵢ``: each coordinate keeps other tasks.

    Task-specific parameters get ``1/m`` of their loss gradient (what the mean gives them), so the whole update
    is on the scale of the mean gradient, as in TorchJD.

    Args:
        trim: number of values removed at each end of every coordinate; needs ``m ≥ 2·trim + 1`` tasks.
        jacobian: ``task_jacobian`` backend (see :class:`~mtml.weighting._base.JacobianWeighting`).
    """

    def __init__(self, task_names: Sequence[str], /, *, trim: int = 1, jacobian: str = "auto") -> None:
        super().__init__(task_names, jacobian=jacobian)
        if isinstance(trim, bool) or not isinstance(trim, int) or trim < 0:
            raise ConfigError(f"`trim` must be an integer >= 0. Got {trim!r}.")
        if self.num_tasks < 2 * trim + 1:
            raise ConfigError(f"trimmed_mean with trim={trim} needs at least {2 * trim + 1} tasks, got "
                              f"{self.num_tasks}; use trim <= {(self.num_tasks - 1) // 2}.")
        self.trim = trim

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> JacobianUpdate:
        m, t = self.num_tasks, self.trim
        kept = torch.sort(jacobian, dim=0).values[t : m - t]
        return JacobianUpdate(kept.mean(0), torch.full_like(losses, 1.0 / m))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trim={self.trim}"
