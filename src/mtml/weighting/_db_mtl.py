"""DB-MTL: dual-balancing multi-task learning.

Lin, Ye, Zhang & Kwok, "Dual-Balancing for Multi-Task Learning", 2023 (arXiv:2308.12029).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting


class DBMTL(GramianWeighting):
    """Balances loss scales (every task is trained on ``log(Lᵢ + ε)``) and gradient magnitudes (every task's
    log-loss gradient is scaled up to the largest one's norm).

    In weights: ``∇log(Lᵢ+ε) = gᵢ/(Lᵢ+ε)``, so ``wᵢ = aᵢ/(Lᵢ+ε)`` with ``aᵢ = max_j n̄ⱼ / n̄ᵢ``, where ``n̄ᵢ`` is an
    exponential moving average (a buffer, rate ``β/t^σ`` as in the authors' code) of ``‖gᵢ‖/(Lᵢ+ε) = √Gᵢᵢ/(Lᵢ+ε)``.
    The authors average the gradient *vectors* and combine those averages; a combination of past gradients
    is not a weighting of this step's gradients, so here the average is of the norms only — a deliberate,
    documented departure. Weights are detached.

    Args:
        beta: EMA coefficient β (authors' default 0.9).
        sigma: decay exponent σ of the EMA coefficient (authors' default 0.5).
        eps: ε inside the logarithm.
        gramian: Gramian backend.
    """

    average: Tensor
    steps: Tensor

    def __init__(self, task_names: Sequence[str], /, *, beta: float = 0.9, sigma: float = 0.5, eps: float = 1e-8,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ConfigError(f"`beta` must be in [0, 1). Got {beta!r}.")
        for key, value in (("sigma", sigma), ("eps", eps)):
            if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
                raise ConfigError(f"`{key}` must be a finite number >= 0. Got {value!r}.")
        self.beta, self.sigma, self.eps = float(beta), float(sigma), float(eps)
        self.register_buffer("average", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        scale = losses.detach().to(self.average).clamp_min(0.0) + max(self.eps, 1e-30)
        norms = gramian.detach().to(self.average).diagonal().clamp_min(0.0).sqrt() / scale
        if self.training:
            self.steps += 1
            rate = self.beta / float(self.steps) ** self.sigma
            self.average.copy_(norms + rate * (self.average - norms))
            average = self.average
        else:
            average = norms if float(self.steps) == 0 else self.average
        top = average.max()
        a = torch.where(average > 1e-12 * top.clamp_min(1e-300), top / average.clamp_min(1e-300),
                        torch.ones_like(average))
        return (a / scale).to(losses)
