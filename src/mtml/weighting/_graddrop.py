"""GradDrop: gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models
with Gradient Sign Dropout", NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import JacobianUpdate, JacobianWeighting
from mtml.weighting._random import Draws


def sign_purity(jacobian: Tensor) -> Tensor:
    """``P = ½(1 + Σᵢ gᵢ / Σᵢ |gᵢ|)`` per coordinate of ``jacobian [m, d]`` → ``[d]`` in ``[0, 1]``; ``½`` where
    every task's gradient is 0."""
    total = jacobian.abs().sum(0)
    ratio = torch.where(total > 0, jacobian.sum(0) / torch.where(total > 0, total, 1.0), 0.0)
    return 0.5 * (1.0 + ratio)


def drop_signs(jacobian: Tensor, uniform: Tensor, leak: Tensor) -> Tensor:
    """GradDrop's combination with the uniform draws ``uniform [d]``: per coordinate keep the positive task
    components when ``P > U``, the negative ones when ``P < U``; task i passes ``leakᵢ`` of a dropped component.
    Returns ``Σᵢ (leakᵢ + (1 − leakᵢ)·Mᵢ) ⊙ gᵢ`` ``[d]``."""
    purity = sign_purity(jacobian)
    keep = ((purity > uniform) & (jacobian > 0)) | ((purity < uniform) & (jacobian < 0))  # [m, d]
    lk = leak.to(jacobian)[:, None]
    return ((lk + (1.0 - lk) * keep.to(jacobian)) * jacobian).sum(0)


class GradDrop(JacobianWeighting):
    """Per coordinate of the shared parameters, draw ``U ~ Uniform[0, 1)`` and keep only the positive task
    components when the positive sign purity ``P = ½(1 + Σgᵢ/Σ|gᵢ|)`` exceeds ``U``, only the negative ones
    otherwise; the update is the sum of what is kept. Where all tasks agree in sign nothing is dropped
    (``P ∈ {0, 1}``), so the update is ``Σgᵢ``, as :class:`~mtml.weighting.Equal` gives.

    Applied to the Jacobian of the shared PARAMETERS (as TorchJD's aggregator), not to the shared
    representation where the paper and LibMTL insert it (there ``P`` comes from the batch-summed, input-sign
    corrected activation gradients). Task-specific parameters get their own loss gradient (weights 1). The
    draws come from ``seed`` and a counter buffer (one draw per step), so a checkpoint resumes them exactly.

    Args:
        leak: in ``[0, 1]``, one number or one per task: the fraction of a dropped component that still passes
            (``1`` = no dropout for that task).
        seed: seed of the uniform draws.
        jacobian: ``task_jacobian`` backend (see :class:`~mtml.weighting._base.JacobianWeighting`).
    """

    stochastic = True

    def __init__(self, task_names: Sequence[str], /, *, leak: float | Sequence[float] = 0.0, seed: int = 0,
                 jacobian: str = "auto") -> None:
        super().__init__(task_names, jacobian=jacobian)
        values = [leak] * self.num_tasks if isinstance(leak, int | float) else list(leak)
        if len(values) != self.num_tasks:
            raise ConfigError(f"`leak`: got {len(values)} values for {self.num_tasks} tasks; give one number or "
                              "one per task.")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and 0 <= v <= 1):
                raise ConfigError(f"`leak` values must be numbers in [0, 1]. Got {v!r}.")
        self.leak = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.draws = Draws(seed)

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> JacobianUpdate:
        uniform = torch.from_numpy(self.draws.next().random(jacobian.shape[1])).to(jacobian)
        return JacobianUpdate(drop_signs(jacobian, uniform, self.leak), torch.ones_like(losses))
