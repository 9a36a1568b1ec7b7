"""MoDo: multi-objective gradient with double sampling.

Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023 (JMLR 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._simplex import simplex_projection


class MoDo(GramianWeighting):
    """Task weights ``λ`` on the simplex follow one projected gradient step per training step on MGDA's
    objective ``½λᵀGλ`` (plus ``½ρ‖λ‖²``): ``λ ← Π_Δ(λ − γ·(Gλ + ρλ))``, and the update is ``Σ λᵢgᵢ`` with the new
    ``λ``. ``λ`` is a buffer (uniform at first) and advances only in training mode. As in the authors' code and
    LibMTL, ``G`` is not rescaled, so ``gamma`` acts in the units of the squared gradient norms.

    The paper's *double sampling* estimates ``Gλ`` from two independent mini-batches (``J_ξ₁ J_ξ₂ᵀ λ``, unbiased)
    and updates the model with a third; here the step's one Gramian ``J Jᵀ`` serves for both, which biases the
    ``λ`` step by the batch noise (the convergence guarantee assumes the independent pair) but needs no extra
    batches.

    Args:
        gamma: ``γ > 0``, the step size of ``λ`` (LibMTL: 0.001).
        rho: ``ρ ≥ 0``, the ℓ₂ regularisation of ``λ`` (LibMTL: 0.1).
        gramian: Gramian backend.
    """

    lambd: Tensor

    def __init__(self, task_names: Sequence[str], /, *, gamma: float = 0.001, rho: float = 0.1,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < math.inf:
            raise ConfigError(f"`gamma` must be a finite number > 0. Got {gamma!r}.")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho < math.inf:
            raise ConfigError(f"`rho` must be a finite number >= 0. Got {rho!r}.")
        self.gamma, self.rho = float(gamma), float(rho)
        m = self.num_tasks
        self.register_buffer("lambd", torch.full((m,), 1.0 / m, dtype=torch.float64))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = gramian.detach().to(self.lambd)
        lam = self.lambd
        new = simplex_projection(lam - self.gamma * (0.5 * (g + g.T) @ lam + self.rho * lam))
        if self.training:
            self.lambd.copy_(new)
        return new.to(losses)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, rho={self.rho}"
