"""UPGrad: the unconflicting projection of gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, nnqp, to_weights


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
        for key, value in (("norm_eps", norm_eps), ("reg_eps", reg_eps)):
            if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
                raise ConfigError(f"`{key}` must be a finite number >= 0. Got {value!r}.")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = g.shape[0]
        trace = float(np.trace(g))
        g = g / trace if trace >= self.norm_eps else np.zeros_like(g)
        q = g + max(self.reg_eps, 1e-12) * np.eye(m)
        total = np.zeros(m)
        for i in range(m):
            low = np.zeros(m)
            low[i] = 1.0 / m
            total += low + nnqp(q, q @ low)
        return to_weights(total, losses)
