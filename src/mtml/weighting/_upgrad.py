"""UPGrad: the unconflicting projection of gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml._checks import check_nonnegative
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, nnqp, to_weights, trace_ridged


class UPGrad(GramianWeighting):
    """Each task gradient ``gᵢ`` (scaled by ``1/m``) is projected onto the dual cone of the gradients (the
    directions that conflict with none), and the projections are summed. In weights: ``w = Σᵢ vⁱ`` with
    ``vⁱ = argmin_{v ≥ eᵢ/m} vᵀGv`` — m non-negative QPs solved exactly by an active-set method. The result
    never conflicts with any task (``G·w ≥ 0``). As in the authors' TorchJD, ``G`` is first divided by its
    trace (a trace below ``norm_eps`` counts as a zero Gramian) and given a ridge ``reg_eps·I``.

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
        total = np.zeros(m)
        for i in range(m):
            low = np.zeros(m)
            low[i] = 1.0 / m
            total += low + nnqp(q, q @ low)
        return to_weights(total, losses)
