"""MGDA: the multiple-gradient descent algorithm, and its upper-bound (representation-level) variant MGDA-UB.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", C. R. Math. 2012;
Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, min_norm_simplex, to_weights

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GramianWeighting):
    """Weights of the min-norm point of the convex hull of the task gradients: ``argmin_{w ∈ Δ} wᵀGw``.

    The result is a common descent direction (Pareto-stationary points give 0). Solved exactly by an
    active-set QP (:func:`~mtml.weighting._solvers.min_norm_simplex`). With ``normalization`` the gradients are
    first divided by ``nᵢ`` (``l2``: ‖gᵢ‖; ``loss``: Lᵢ; ``loss+``: Lᵢ·‖gᵢ‖, as in Sener & Koltun's code) and the
    weights returned are ``wᵢ/nᵢ``.

    Args:
        normalization: ``none`` (default), ``l2``, ``loss`` or ``loss+``.
        gramian: Gramian backend; :class:`MGDAUB` is this class with ``representation``.
    """

    permutation_equivariant = True

    def __init__(self, task_names: Sequence[str], /, *, normalization: str = "none", gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if normalization not in _NORMALIZATIONS:
            raise ConfigError(f"`normalization` must be one of {', '.join(_NORMALIZATIONS)}. Got {normalization!r}.")
        self.normalization = normalization

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
        loss = losses.detach().to("cpu").double().numpy()
        n = {"none": np.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[self.normalization]
        n = np.where(n > 1e-12, n, 1.0)
        w = min_norm_simplex(g / np.outer(n, n))
        return to_weights(w / n, losses)


class MGDAUB(MGDA):
    """MGDA-UB: MGDA on the Gramian of gradients with respect to the shared representation (Sener & Koltun's
    upper bound), which costs one backward through the heads instead of per-task backwards through the trunk.
    Same options as :class:`MGDA`; ``gramian`` defaults to ``representation``.
    """

    def __init__(
        self, task_names: Sequence[str], /, *, normalization: str = "none", gramian: str = "representation"
    ) -> None:
        super().__init__(task_names, normalization=normalization, gramian=gramian)
