"""ConFIG: conflict-free gradient updates.

Liu, Chen & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025
(arXiv:2408.11104).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, to_weights


class ConFIG(GramianWeighting):
    """The update has the same positive projection on every unit task gradient, and its length is the sum of
    the task gradients' projections on it: with unit gradients ``ûᵢ = gᵢ/‖gᵢ‖`` (rows of ``Û``), the direction
    is ``d = Û⁺·1`` (so ``ûᵢᵀd = 1`` for every task when the gradients are linearly independent; the least-squares
    fit otherwise) and the update is ``(Σᵢ gᵢᵀd̂)·d̂`` with ``d̂ = d/‖d‖``.

    From the Gramian alone: ``Û Ûᵀ = D⁻¹GD⁻¹`` (``D = diag ‖gᵢ‖``), ``d = Jᵀa`` with ``a = D⁻¹(D⁻¹GD⁻¹)⁺·1``, so
    ``‖d‖² = aᵀGa``, ``Σᵢ gᵢᵀd = 1ᵀGa`` and the weights are ``w = a·(1ᵀGa)/(aᵀGa)``. The pseudo-inverse drops
    eigenvalues of ``D⁻¹GD⁻¹`` below ``10·m·ε·λ_max`` (ε of the Gramian's dtype: directions a Gramian of that
    precision cannot resolve); the paper's code applies ``pinv`` to ``Û`` itself with torch's default cut-off.
    Tasks with a zero gradient (norm below 1e-12 of the largest) get weight 0; a zero Gramian gives zero weights
    (no update), as in the paper's code.

    Weights can be negative (a task whose gradient lies inside the cone of the others): that is the method.

    Args:
        gramian: Gramian backend.
    """

    nonnegative = False
    permutation_equivariant = True

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = g.shape[0]
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
        live = norms > 1e-12 * max(float(norms.max()), 1e-150)
        inv = np.where(live, 1.0 / np.where(live, norms, 1.0), 0.0)
        unit = g * np.outer(inv, inv)
        lam, vec = np.linalg.eigh(0.5 * (unit + unit.T))
        keep = lam > max(10.0 * m * _eps(gramian) * float(lam.max()), 1e-300)
        a = inv * (vec[:, keep] @ ((vec[:, keep].T @ np.ones(m)) / lam[keep]))
        sq = float(a @ g @ a)
        if not sq > 0.0:
            return to_weights(np.zeros(m), losses)
        return to_weights(a * (float(np.ones(m) @ g @ a) / sq), losses)


def _eps(t: Tensor) -> float:
    """Machine epsilon of ``t``'s dtype (float64's for non-float tensors)."""
    return float(torch.finfo(t.dtype if t.is_floating_point() else torch.float64).eps)
