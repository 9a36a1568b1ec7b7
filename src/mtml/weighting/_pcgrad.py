"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml.weighting._base import GramianWeighting
from mtml.weighting._random import Draws
from mtml.weighting._solvers import Array, as_numpy, to_weights


def project_conflicts(gramian: Array, orders: Sequence[Sequence[int]]) -> Array:
    """PCGrad in the span of the gradients: row i holds the coefficients of the projected ``gᵢ``.

    ``gᵢ ← gᵢ − (gᵢ·gⱼ/‖gⱼ‖²)·gⱼ`` for each ``j`` in ``orders[i]`` whenever ``gᵢ·gⱼ < 0``; with ``gᵢ = cᵢᵀJ`` the
    dot product is ``cᵢᵀG[:, j]``, so only ``G [m, m]`` is needed. Returns ``C [m, m]``.
    """
    m = gramian.shape[0]
    coef = np.eye(m)
    for i in range(m):
        c = coef[i]
        for j in orders[i]:
            if j == i:
                continue
            dot = float(c @ gramian[:, j])
            if dot < 0.0 and gramian[j, j] > 0.0:
                c[j] -= dot / gramian[j, j]
    return coef


class PCGrad(GramianWeighting):
    """Each task gradient drops its component along every other task gradient it conflicts with (negative
    inner product), visiting the others in a random order; the update is the sum of the projected gradients.

    As weights: ``w = Σᵢ cᵢ`` with ``cᵢ`` from :func:`project_conflicts` — the same combined gradient as
    projecting the gradient vectors themselves, from the Gramian alone. Weights are ≥ 0 (a projection only adds
    positive multiples of conflicting gradients). The random orders come from ``seed`` and a draw counter
    kept in a buffer, so a checkpoint resumes the same sequence.

    Args:
        seed: seed of the projection orders.
        gramian: Gramian backend (see :class:`~mtml.weighting._base.GramianWeighting`).
    """

    stochastic = True

    def __init__(self, task_names: Sequence[str], /, *, seed: int = 0, gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        self.draws = Draws(seed)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        m = self.num_tasks
        rng = self.draws.next()
        orders = [rng.permutation(m).tolist() for _ in range(m)]
        return to_weights(project_conflicts(as_numpy(gramian), orders).sum(0), losses)
