"""Homoscedastic uncertainty weighting.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics",
CVPR 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtml.weighting._base import Weighting


class Uncertainty(Weighting):
    """Learned log-variances ``sᵢ``: objective ``Σ ½·exp(−sᵢ)·Lᵢ + ½·sᵢ``.

    The weights ``½·exp(−sᵢ)`` are *not* detached: the optimiser learns ``s`` through them, and
    :meth:`penalty` adds ``½·Σ sᵢ`` so the variances cannot grow without bound.

    Args:
        init_log_var: initial ``sᵢ`` for every task.
    """

    def __init__(self, task_names: Sequence[str], /, *, init_log_var: float = 0.0) -> None:
        super().__init__(task_names)
        self.log_var = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        return 0.5 * torch.exp(-self.log_var)

    def penalty(self) -> Tensor:
        return 0.5 * self.log_var.sum()
