"""IMTL: impartial multi-task learning (gradient part IMTL-G and loss part IMTL-L).

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtml.weighting._base import GramianWeighting, Weighting
from mtml.weighting._solvers import as_numpy, to_weights


class IMTLG(GramianWeighting):
    """IMTL-G: the combined gradient ``g = Σ wᵢgᵢ`` (``Σwᵢ = 1``) has equal projections on every unit task
    gradient, ``g·uᵢ = g·uⱼ``. With ``G`` the Gramian and ``dᵢ = ‖gᵢ‖`` that is ``Gw ∝ d``, so
    ``w = G⁺d / Σ(G⁺d)`` (pseudo-inverse when gradients are dependent).

    Weights can be negative (for three or more strongly aligned tasks) — that is the method. When ``Σ G⁺d`` is
    0 (all gradients 0) the weights are uniform.

    Args:
        gramian: Gramian backend.
    """

    nonnegative = False
    permutation_equivariant = True

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = g.shape[0]
        d = np.sqrt(np.clip(np.diag(g), 0.0, None))
        if not float(d.max()) > 1e-150:
            return to_weights(np.full(m, 1.0 / m), losses)
        scale = float(d.max()) ** 2
        v = np.linalg.pinv(g / scale, rcond=m * np.finfo(np.float64).eps, hermitian=True) @ (d / np.sqrt(scale))
        total = float(v.sum())
        w = v / total if abs(total) > 1e-12 else np.full(m, 1.0 / m)
        return to_weights(w, losses)


class IMTLL(Weighting):
    """IMTL-L: learned loss scales ``wᵢ = exp(sᵢ)`` with penalty ``−Σ sᵢ``, so that every scaled loss
    ``exp(sᵢ)·Lᵢ − sᵢ`` is driven to 1 (its minimum over ``sᵢ``). The weights are not detached: the optimiser
    learns ``s`` through them.

    Args:
        init_scale: initial ``sᵢ``.
    """

    def __init__(self, task_names: Sequence[str], /, *, init_scale: float = 0.0) -> None:
        super().__init__(task_names)
        self.scale = nn.Parameter(torch.full((self.num_tasks,), float(init_scale)))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        return torch.exp(self.scale).to(losses.dtype)

    def penalty(self) -> Tensor:
        return -self.scale.sum()
