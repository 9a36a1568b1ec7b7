"""MoCo: stochastic multi-objective gradient correction with tracked gradients.

Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective Learning: A
Provably Convergent Approach", ICLR 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError, ShapeError
from mtml.weighting._base import JacobianUpdate, JacobianWeighting
from mtml.weighting._simplex import simplex_projection

NORMALIZE = ("none", "loss")


class MoCo(JacobianWeighting):
    """Tracked gradient estimates ``Y [m, d]`` and simplex weights ``λ``, updated every step ``k = 1, 2, …``::

        yᵢ ← yᵢ − βₖ (yᵢ − gᵢ)                 βₖ = beta / k^beta_decay
        λ  ← Π_Δ(λ − γₖ (Y Yᵀ + ρ I) λ)        γₖ = gamma / k^gamma_decay
        update = Yᵀλ

    The tracking removes the bias of a min-norm direction computed from noisy mini-batch gradients (MGDA's
    subproblem solved by one projected-gradient step per update). ``Y`` starts at 0 and ``λ`` at ``1/m``; both are
    buffers (``Y`` is gradient-sized: ``m × d`` extra memory). Task-specific parameters get ``λᵢ`` times their
    current loss gradient (not a tracked one). ``normalize="loss"`` rescales each ``gᵢ`` to norm ``Lᵢ`` first, as
    LibMTL does (which also uses a softmax instead of the simplex projection).

    Args:
        beta: tracking rate (in ``(0, 1]``).
        beta_decay: exponent of the tracking rate's decay.
        gamma: step size of ``λ``.
        gamma_decay: exponent of its decay.
        rho: ℓ2 regularisation of the ``λ`` subproblem (≥ 0).
        normalize: ``none`` (the paper) or ``loss``.
        jacobian: ``task_jacobian`` backend (see :class:`~mtml.weighting._base.JacobianWeighting`).
    """

    lazy_buffers = ("y",)
    count: Tensor
    y: Tensor
    lam: Tensor

    def __init__(self, task_names: Sequence[str], /, *, beta: float = 0.5, beta_decay: float = 0.5,
                 gamma: float = 0.1, gamma_decay: float = 0.5, rho: float = 0.0, normalize: str = "none",
                 jacobian: str = "auto") -> None:
        super().__init__(task_names, jacobian=jacobian)
        for name, value, low, high in (("beta", beta, 0.0, 1.0), ("gamma", gamma, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
                raise ConfigError(f"`{name}` must be a number in ({low:g}, {high:g}]. Got {value!r}.")
        for name, value in (("beta_decay", beta_decay), ("gamma_decay", gamma_decay), ("rho", rho)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value)
                                                                                     and value >= 0):
                raise ConfigError(f"`{name}` must be a finite number >= 0. Got {value!r}.")
        if normalize not in NORMALIZE:
            raise ConfigError(f"`normalize` must be one of {', '.join(NORMALIZE)}. Got {normalize!r}.")
        self.beta, self.beta_decay, self.gamma, self.gamma_decay = float(beta), float(beta_decay), float(gamma), \
            float(gamma_decay)
        self.rho, self.normalize = float(rho), normalize
        m = self.num_tasks
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("y", torch.zeros(m, 0))
        self.register_buffer("lam", torch.full((m,), 1.0 / m, dtype=torch.float64))

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> JacobianUpdate:
        m, d = jacobian.shape
        grads = jacobian
        if self.normalize == "loss":
            norms = grads.norm(dim=1, keepdim=True)
            grads = grads / (norms + 1e-8) * losses.to(grads)[:, None]
        if int(self.count) == 0:
            self.y = grads.new_zeros(m, d)
        elif self.y.shape != (m, d):
            raise ShapeError(f"MoCo: the per-task gradients have {d} coordinates but the tracked ones have "
                             f"{self.y.shape[1]}; the shared parameters changed since the weighting's first step.")
        self.count += 1
        k = float(self.count)
        beta, gamma = self.beta / k ** self.beta_decay, self.gamma / k ** self.gamma_decay
        y = self.y.to(grads)
        y = y - beta * (y - grads)
        lam = self.lam  # float64: the m-dimensional subproblem costs nothing
        reg = (y @ y.T).to(lam) + self.rho * torch.eye(m, dtype=lam.dtype, device=lam.device)
        lam = simplex_projection(lam - gamma * (reg @ lam))
        self.y, self.lam = y, lam
        return JacobianUpdate(lam.to(y) @ y, lam.to(losses))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, beta={self.beta}, gamma={self.gamma}, rho={self.rho}, "
                f"normalize={self.normalize}")
