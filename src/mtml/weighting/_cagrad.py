"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import Array, as_numpy, nnqp, scaled, to_weights


def cagrad_dual(gramian: Array, c: float, *, ridge: float = 1e-9) -> Array:
    """``u = k·w*`` where ``w* = argmin_{w ∈ Δ} bᵀw + s·‖g_w‖`` (``b = G·1/m``, ``s = c·‖g₀‖``, ``k = s/‖g_w*‖``).

    The paper's update is ``d = g₀ + (s/‖g_w*‖)·g_w*``, i.e. weights ``1/m + u``. The KKT conditions say ``u``
    solves the non-negative QP ``min_{u ≥ 0} ½uᵀGu + (b − λ1)ᵀu`` for the ``λ`` at which ``‖g_u‖ = s``;
    ``‖g_{u(λ)}‖`` grows with ``λ``, so we search ``λ``: on a fixed active set ``‖g_u‖²`` is quadratic in
    ``λ`` and its root is the next guess (safeguarded by bisection).
    """
    m = gramian.shape[0]
    g, scale = scaled(gramian)
    if scale == 0.0:
        return np.zeros(m)
    q = g + ridge * np.eye(m)
    b = g.mean(1)
    s = c * float(np.sqrt(max(b.mean(), 0.0)))
    if s <= 0.0:
        return np.zeros(m)
    lo, hi = float(b.min()), np.inf
    lam = lo + s * np.sqrt(m)
    u = np.zeros(m)
    for _ in range(60):
        u = nnqp(q, b - lam)
        norm = float(np.sqrt(max(float(u @ q @ u), 0.0)))
        if abs(norm - s) <= 1e-10 * s:
            break
        if norm < s:
            lo = lam
        else:
            hi = lam
        idx = np.flatnonzero(u > 0)
        guess = np.nan
        if idx.size:
            qp = q[np.ix_(idx, idx)]
            p, r = np.linalg.solve(qp, np.ones(idx.size)), np.linalg.solve(qp, b[idx])
            a2, a1, a0 = p.sum(), -2.0 * r.sum(), float(b[idx] @ r) - s * s
            disc = a1 * a1 - 4.0 * a2 * a0
            if a2 > 0 and disc >= 0:
                guess = (-a1 + np.sqrt(disc)) / (2.0 * a2)
        if np.isfinite(guess) and lo < guess < hi:
            lam = float(guess)
        else:
            lam = 0.5 * (lo + hi) if np.isfinite(hi) else lo + 2.0 * max(lam - lo, s)
    return u


class CAGrad(GramianWeighting):
    """The update maximises the worst task's improvement within a ball around the mean gradient ``g₀``:
    ``max_d minᵢ gᵢᵀd`` s.t. ``‖d − g₀‖ ≤ c‖g₀‖``, solved in its dual over the simplex. As weights:
    ``(1/m + u)/r`` with ``u`` from :func:`cagrad_dual` (exact active-set search, no iterative SLSQP) and
    ``r`` the paper code's rescaling (``rescale``: 0 → 1, 1 → 1 + c², 2 → 1 + c).

    Args:
        c: radius of the ball, relative to ‖g₀‖ (paper: 0.4–0.5; 0 gives the mean gradient).
        rescale: 0, 1 (default, as the paper's code) or 2.
        gramian: Gramian backend.
    """

    permutation_equivariant = True

    def __init__(
        self, task_names: Sequence[str], /, *, c: float = 0.5, rescale: int = 1, gramian: str = "auto"
    ) -> None:
        super().__init__(task_names, gramian=gramian)
        if not (isinstance(c, (int, float)) and 0.0 <= c < float("inf")):
            raise ConfigError(f"`c` must be a finite number >= 0. Got {c!r}.")
        if rescale not in (0, 1, 2):
            raise ConfigError(f"`rescale` must be 0, 1 or 2. Got {rescale!r}.")
        self.c = float(c)
        self.rescale = int(rescale)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        m = self.num_tasks
        u = cagrad_dual(as_numpy(gramian), self.c)
        r = (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]
        return to_weights((1.0 / m + u) / r, losses)
