"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS 2023 (arXiv:2305.18409).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._simplex import simplex_projection


class SDMGrad(GramianWeighting):
    """The update ``d = Jᵀ(w + λ·w̃)/(1 + λ)`` stays near the mean gradient ``g₀ = Jᵀw̃`` (``w̃ = 1/m``) while
    ``w`` on the simplex minimises ``½‖Jᵀw + λ·g₀‖² = ½(w + λw̃)ᵀG(w + λw̃)``: large ``λ`` approaches the mean
    gradient, ``λ = 0`` MGDA's min-norm point. As in the authors' code (and LibMTL's), ``w`` is improved by
    ``iterations`` steps of projected gradient descent with heavy-ball momentum (a fresh velocity each call)
    from the previous step's ``w`` (a buffer, uniform at first), on ``G`` divided by the squared mean gradient
    norm ``(mean √Gᵢᵢ)² + 1e-8``, so ``lr`` does not depend on the gradients' scale.

    The paper estimates ``G`` from two independent mini-batches (``J_ξ J_ξ'ᵀ``, unbiased for the population
    Gramian) and applies the weights to a third batch's gradients; here the one Gramian of the step's batch
    serves for both: the deterministic form of the method, whose ``G`` carries the batch's noise in both factors
    (a biased estimate; the paper's guarantees assume the independent pair). Weights sum to 1; ``w`` advances
    only in training mode.

    Args:
        lam: ``λ ≥ 0``, the pull towards the mean gradient (LibMTL's and the authors' experiments: 0.3).
        iterations: projected-gradient steps per call (LibMTL: 20).
        lr: their step size (LibMTL: 5).
        momentum: heavy-ball coefficient in ``[0, 1)`` (LibMTL and the authors' code: 0.5).
        gramian: Gramian backend.
    """

    w: Tensor

    def __init__(self, task_names: Sequence[str], /, *, lam: float = 0.3, iterations: int = 20, lr: float = 5.0,
                 momentum: float = 0.5, gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if not _number(lam) or not 0.0 <= lam < math.inf:
            raise ConfigError(f"`lam` must be a finite number >= 0. Got {lam!r}.")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"`iterations` must be an integer >= 1. Got {iterations!r}.")
        if not _number(lr) or not 0.0 < lr < math.inf:
            raise ConfigError(f"`lr` must be a finite number > 0. Got {lr!r}.")
        if not _number(momentum) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"`momentum` must be in [0, 1). Got {momentum!r}.")
        self.lam, self.iterations, self.lr, self.momentum = float(lam), iterations, float(lr), float(momentum)
        m = self.num_tasks
        self.register_buffer("w", torch.full((m,), 1.0 / m, dtype=torch.float64))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = gramian.detach().to(self.w)
        g = 0.5 * (g + g.T)
        scale = g.diagonal().clamp_min(0.0).sqrt().mean()
        a = g / (scale.square() + 1e-8)
        pull = torch.full_like(self.w, self.lam / self.num_tasks)
        w = self.w.clone()
        velocity = torch.zeros_like(w)
        for step in range(self.iterations):
            grad = a @ (w + pull)
            velocity = grad if step == 0 else self.momentum * velocity + grad
            w = simplex_projection(w - self.lr * velocity)
        if self.training:
            self.w.copy_(w)
        return ((w + pull) / (1.0 + self.lam)).to(losses)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, iterations={self.iterations}, lr={self.lr}"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
