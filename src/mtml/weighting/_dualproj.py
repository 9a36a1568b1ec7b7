"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232), the aggregator of
their TorchJD; the projection is Lopez-Paz & Ranzato's (GEM, NeurIPS 2017, Eq. 11).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml._checks import check_nonnegative
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, nnqp, to_weights, trace_ridged


class DualProj(GramianWeighting):
    """The mean gradient ``ḡ = Jᵀu`` (``u = 1/m``) projected onto the dual cone ``{d : Jd ≥ 0}`` of the task
    gradients — the closest direction to ``ḡ`` that conflicts with no task. By the duality of Quinton & Rey
    (Prop. 1), the projection is ``Jᵀv`` with ``v = argmin_{v ≥ u} vᵀGv``: one non-negative QP on the Gramian,
    solved exactly by the active-set :func:`~mtml.weighting._solvers.nnqp` (TorchJD calls quadprog). As in
    TorchJD, ``G`` is first divided by its trace (a trace below ``norm_eps`` counts as a zero Gramian) and given
    a ridge ``reg_eps·I``. The weights are ``v ≥ 1/m``; when ``ḡ`` already conflicts with no task, ``v = u``.

    Args:
        norm_eps: trace below which the Gramian is treated as zero.
        reg_eps: ridge added to the trace-normalised Gramian.
        gramian: Gramian backend.
    """

    permutation_equivariant = True

    def __init__(self, task_names: Sequence[str], /, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        self.norm_eps = check_nonnegative("norm_eps", norm_eps)
        self.reg_eps = check_nonnegative("reg_eps", reg_eps)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = g.shape[0]
        q = trace_ridged(g, self.norm_eps, self.reg_eps)
        u = np.full(m, 1.0 / m)
        return to_weights(u + nnqp(q, q @ u), losses)
