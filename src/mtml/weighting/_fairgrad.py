"""FairGrad: α-fair resource allocation between tasks.

Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import Array, as_numpy, scaled, to_weights


def _jacobi_solve(h: Array, r: Array) -> Array:
    """``h⁻¹r`` for symmetric positive definite ``h``, solved with unit diagonal (tasks of very different scales)."""
    d = 1.0 / np.sqrt(np.diag(h))
    return np.asarray(d * np.linalg.solve(h * d[:, None] * d[None, :], d * r), dtype=np.float64)


def alpha_fair(gramian: Array, alpha: float, *, ridge: float = 1e-10, iters: int = 100) -> Array:
    """FairGrad's weights: ``w > 0`` with ``(Gw)ᵢ = wᵢ^(−1/α)`` for every task (α = 1: Nash-MTL's ``wᵢ(Gw)ᵢ = 1``).

    The stationary point of the strictly convex ``f(w) = ½wᵀGw − Σᵢ φ(wᵢ)``, ``φ′(w) = w^(−1/α)`` (``φ = log`` at
    α = 1, else ``(w^(1−1/α) − 1)/(1−1/α)``), found by damped Newton: the Hessian ``G + diag(w^(−1/α−1)/α)`` is
    positive definite; each step goes at most 99% of the way to the boundary ``w = 0``, then backtracks until
    ``f`` decreases enough (Armijo). It stops when the Newton decrement is below ``1e-20·|f|`` or the iterate no
    longer moves. As in :func:`~mtml.weighting._solvers.nash_bargaining`, ``G`` is scaled to unit mean diagonal
    (``G = s·g``: then ``w = s^(−α/(α+1))·u`` with ``(gu)ᵢ = uᵢ^(−1/α)``) and given a ridge, ``ε·gᵢᵢ`` on each
    diagonal entry (relative to each task, so tasks of very different gradient norms are biased alike;
    ``nash_bargaining`` adds ``ε·I``), so that gradients whose convex cone contains 0 (no exact solution) still
    give finite weights. Starts from each task's solution alone, ``uᵢ = gᵢᵢ^(−α/(α+1))``. Rows with a zero
    diagonal must be removed first.
    """
    g, s = scaled(gramian)
    g = g + ridge * np.diag(np.diag(g))
    p = 1.0 / alpha
    u = np.diag(g) ** (-alpha / (alpha + 1.0))

    def f(v: Array) -> float:
        log_v = np.log(v)
        phi = log_v if alpha == 1.0 else np.expm1((1.0 - p) * log_v) / (1.0 - p)  # stable as α → 1
        return float(0.5 * v @ g @ v - phi.sum())

    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for _ in range(iters):
            grad = g @ u - u**-p
            step = _jacobi_solve(g + np.diag(p * u ** (-p - 1.0)), grad)
            decrement, current = float(grad @ step), f(u)
            if not decrement > 1e-20 * max(1.0, abs(current)):
                break
            down = step > 0
            t = min(1.0, 0.99 * float(np.min(u[down] / step[down]))) if down.any() else 1.0
            while not f(u - t * step) <= current - 0.25 * t * decrement:
                t *= 0.5
                if t < 1e-14:  # no decrease left at float64 resolution: converged
                    break
            if t < 1e-14:
                break
            new = u - t * step
            moved = bool(np.any(np.abs(new - u) > 1e-15 * u))
            u = new
            if not moved:
                break
    return np.asarray(u * s ** (-alpha / (alpha + 1.0)), dtype=np.float64)


class FairGrad(GramianWeighting):
    """α-fair weights: ``d = Σ wᵢgᵢ`` with ``(Gw)ᵢ = gᵢᵀd = wᵢ^(−1/α)`` — the update maximising the α-fair
    utility ``Σᵢ (gᵢᵀd)^(1−α)/(1−α)`` under a norm budget (α = 0: the mean gradient's direction; α = 1:
    proportional fairness, Nash-MTL; α → ∞: max-min fairness). Solved exactly in float64 by damped Newton on a
    strictly convex potential (:func:`alpha_fair`); the paper's code calls scipy's ``least_squares`` on
    ``Gw − w^(−1/α)`` from uniform weights. Stateless: every step solves afresh.

    As the paper's code (and mtml's ``nash_mtl``), the update is clipped to norm ``max_norm``: when
    ``‖Σwᵢgᵢ‖ = √(wᵀGw)`` exceeds it, w is scaled down (heads' gradients are scaled too). The paper's code also
    multiplies the combined shared gradient by m before clipping; here the weights solve the paper's equation
    as written, so an unclipped update is 1/m of theirs. Tasks whose shared gradient is 0 take no part (their
    equation has no solution) and get the mean of the others' weights (1 when every gradient is 0).

    Args:
        alpha: fairness α > 0 (paper's experiments: 2; its code's default: 1).
        max_norm: clip norm of the combined shared gradient (0: no clipping; paper's code: 1).
        gramian: Gramian backend.
    """

    permutation_equivariant = True

    def __init__(self, task_names: Sequence[str], /, *, alpha: float = 2.0, max_norm: float = 1.0,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < math.inf:
            raise ConfigError(f"`alpha` must be a finite number > 0 (2 in the paper). Got {alpha!r}.")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0.0 <= max_norm < math.inf:
            raise ConfigError(f"`max_norm` must be a finite number >= 0 (0: no clipping). Got {max_norm!r}.")
        self.alpha = float(alpha)
        self.max_norm = float(max_norm)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        diag = np.diag(g)
        active = diag > 1e-12 * max(float(diag.max()), 1e-300)
        w = np.ones(self.num_tasks)
        if active.any():
            sub = g[np.ix_(active, active)]
            solved = alpha_fair(sub, self.alpha)
            norm = float(np.sqrt(max(float(solved @ sub @ solved), 0.0)))
            if self.max_norm > 0 and norm > self.max_norm:
                solved = solved * (self.max_norm / norm)
            w[active] = solved
            w[~active] = solved.mean()
        return to_weights(w, losses)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, alpha={self.alpha:g}, max_norm={self.max_norm:g}, gramian={self.gramian}"
