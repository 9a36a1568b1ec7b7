"""Krum and Multi-Krum: Byzantine-robust selection of gradients.

Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017. As TorchJD implements it for Jacobians (Quinton & Rey, arXiv:2406.16232, 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, to_weights


class Krum(GramianWeighting):
    """Each task gradient is scored by the sum of its distances to its ``m − f − 2`` nearest other gradients
    (``f = n_byzantine``), and the update is the mean of the ``n_selected`` gradients with the smallest scores:
    gradients far from the crowd (outliers, or tasks that disagree with most others) are left out. Distances come
    from the Gramian: ``‖gᵢ − gⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ``. The weights are ``1/n_selected`` on the selected tasks
    and 0 elsewhere; ``n_selected = m`` is plain averaging.

    Departures from TorchJD: scores equal to within the Gramian's resolution (``k·4·√(ε·max Gᵢᵢ)``, ``k`` the
    neighbour count, ε of the Gramian's dtype) at the selection boundary share the remaining weight equally
    instead of going to the lowest index, so identical tasks get identical weights and permuting the tasks
    permutes the weights; and with ``n_byzantine = 0`` and at most 2 tasks (where TorchJD refuses, as no
    neighbour remains to score by) every score is 0 and the weights are the mean's, ``1/m``.

    Args:
        n_byzantine: ``f``, the number of gradients that may be adversarial; needs ``m ≥ f + 3`` when > 0.
        n_selected: how many lowest-score gradients are averaged (1: Krum; more: Multi-Krum), at most ``m``.
        gramian: Gramian backend.
    """

    permutation_equivariant = True

    def __init__(self, task_names: Sequence[str], /, *, n_byzantine: int = 0, n_selected: int = 1,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        m = self.num_tasks
        if isinstance(n_byzantine, bool) or not isinstance(n_byzantine, int) or n_byzantine < 0:
            raise ConfigError(f"`n_byzantine` must be an integer >= 0. Got {n_byzantine!r}.")
        if n_byzantine > 0 and m < n_byzantine + 3:
            raise ConfigError(f"`n_byzantine` = {n_byzantine} needs at least n_byzantine + 3 = {n_byzantine + 3} "
                              f"tasks, got {m}; lower `n_byzantine` to at most {max(m - 3, 0)}.")
        if isinstance(n_selected, bool) or not isinstance(n_selected, int) or not 1 <= n_selected <= m:
            raise ConfigError(f"`n_selected` must be an integer from 1 to the number of tasks ({m}). "
                              f"Got {n_selected!r}.")
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = g.shape[0]
        diag = np.diag(g)
        dist = np.sqrt(np.clip(diag[:, None] + diag[None, :] - 2.0 * g, 0.0, None))
        k = max(m - self.n_byzantine - 2, 0)
        others = np.sort(dist + np.diag(np.full(m, np.inf)), axis=1)[:, :k]  # self excluded (sorted last)
        scores = others.sum(axis=1)
        eps = float(torch.finfo(gramian.dtype if gramian.is_floating_point() else torch.float64).eps)
        tol = max(k, 1) * 4.0 * float(np.sqrt(eps * max(float(diag.max()), 0.0)))
        boundary = float(np.sort(scores)[self.n_selected - 1])
        inside = scores < boundary - tol
        tied = ~inside & (scores <= boundary + tol)
        w = np.where(inside, 1.0, 0.0)
        w[tied] = (self.n_selected - int(inside.sum())) / int(tied.sum())
        return to_weights(w / self.n_selected, losses)
