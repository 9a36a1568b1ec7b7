"""Equal weighting: every task's loss counts once."""

from __future__ import annotations

import torch
from torch import Tensor

from mtml.weighting._base import Weighting


class Equal(Weighting):
    """``wᵢ = 1``: the plain sum of task losses (the usual multi-task baseline)."""

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        return torch.ones_like(losses).detach()
