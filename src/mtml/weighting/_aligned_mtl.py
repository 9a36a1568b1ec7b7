"""Aligned-MTL: aligning the principal components of the task gradients.

Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task Learning", CVPR 2023.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, to_weights


class AlignedMTL(GramianWeighting):
    """The gradient matrix ``J = UΣVᵀ`` is replaced by ``σ_min·UVᵀ`` (all singular values equal to the smallest
    non-zero one), which makes the condition number 1. From ``G = VΛVᵀ`` (rank r) that is the balance
    transformation ``B = √λ_r·V_r Λ_r^{-1/2} V_rᵀ`` and weights ``w = B·1`` (the paper's code sums B's rows).

    Weights can be negative — that is the method. A zero Gramian gives weights 1.

    Args:
        gramian: Gramian backend.
    """

    nonnegative = False
    permutation_equivariant = True

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = g.shape[0]
        lam, vec = np.linalg.eigh(g)
        top = float(lam.max()) if m else 0.0
        keep = lam > max(top, 0.0) * m * np.finfo(np.float32).eps
        if top <= 1e-30 or not keep.any():
            return to_weights(np.ones(m), losses)
        lam, vec = lam[keep], vec[:, keep]
        balance = np.sqrt(lam.min()) * (vec / np.sqrt(lam)) @ vec.T
        return to_weights(balance.sum(0), losses)
