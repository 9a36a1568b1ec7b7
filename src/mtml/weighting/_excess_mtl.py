"""ExcessMTL: task weights driven by estimated excess risks.

He, Zhou, Zhao & Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError, ShapeError
from mtml.weighting._base import JacobianUpdate, JacobianWeighting


class ExcessMTL(JacobianWeighting):
    """Weights on the simplex that grow with each task's excess risk (its distance to its own optimum), not
    its loss, so tasks with a high irreducible loss (label noise) do not take over.

    The excess risk of task i is approximated to second order, ``Êᵢ = gᵢᵀ Hᵢ⁻¹ gᵢ``, with the diagonal AdaGrad
    curvature estimate ``Hᵢ = √(Σ_steps gᵢ² + 1e-7)`` (coordinate-wise, accumulated in an ``[m, d]`` buffer).
    The first ``warmup`` calls only record the baseline ``E⁰`` (the mean of their ``Ê``) and keep uniform
    weights; afterwards each call takes an exponentiated-gradient step ``wᵢ ∝ wᵢ·exp(step_size·Êᵢ/E⁰ᵢ)``.
    ``warmup=1`` is the official code's and LibMTL's choice (the first step is the baseline); TorchJD's
    ``n_warmup_steps=k`` is ``warmup=k`` here. The update is ``Σ wᵢgᵢ`` and task-specific parameters get ``wᵢ``
    times their loss gradient. Weights start at ``1/m`` (LibMTL scales them to sum ``m`` instead).

    Args:
        step_size: ``η`` of the exponentiated-gradient step (> 0).
        warmup: calls that only collect the baseline excess risk (≥ 1).
        jacobian: ``task_jacobian`` backend (see :class:`~mtml.weighting._base.JacobianWeighting`).
    """

    lazy_buffers = ("sq_sum",)
    count: Tensor
    sq_sum: Tensor
    w: Tensor
    baseline: Tensor

    def __init__(self, task_names: Sequence[str], /, *, step_size: float = 1.0, warmup: int = 1,
                 jacobian: str = "auto") -> None:
        super().__init__(task_names, jacobian=jacobian)
        if isinstance(step_size, bool) or not isinstance(step_size, int | float) or not (
                math.isfinite(step_size) and step_size > 0):
            raise ConfigError(f"`step_size` must be a finite number > 0. Got {step_size!r}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ConfigError(f"`warmup` must be an integer >= 1 (calls that set the baseline). Got {warmup!r}.")
        self.step_size, self.warmup = float(step_size), warmup
        m = self.num_tasks
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("sq_sum", torch.zeros(m, 0))
        self.register_buffer("w", torch.full((m,), 1.0 / m, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(m, dtype=torch.float64))

    def excess_risk(self, jacobian: Tensor) -> Tensor:
        """Accumulate ``g²`` and return ``Êᵢ = Σ_d gᵢ²/√(Σ_steps gᵢ² + 1e-7)`` ``[m]`` (float64)."""
        m, d = jacobian.shape
        if int(self.count) == 0:
            self.sq_sum = jacobian.new_zeros(m, d)
        elif self.sq_sum.shape != (m, d):
            raise ShapeError(f"ExcessMTL: the per-task gradients have {d} coordinates but the curvature estimate "
                             f"has {self.sq_sum.shape[1]}; the shared parameters changed since its first step.")
        sq = jacobian.square()
        self.sq_sum = self.sq_sum.to(sq) + sq
        return (sq / (self.sq_sum + 1e-7).sqrt()).sum(1).to(self.w)

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> JacobianUpdate:
        risk = self.excess_risk(jacobian)
        self.count += 1
        if int(self.count) <= self.warmup:
            self.baseline = self.baseline + risk
            if int(self.count) == self.warmup:
                self.baseline = self.baseline / self.warmup
        else:
            self.w = torch.softmax(self.w.log() + self.step_size * risk / (self.baseline + 1e-7), 0)
        return JacobianUpdate(self.w.to(jacobian) @ jacobian, self.w.to(losses))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step_size={self.step_size}, warmup={self.warmup}"
