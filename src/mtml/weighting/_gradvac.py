"""GradVac: gradient vaccine.

Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._random import Draws
from mtml.weighting._solvers import as_numpy, to_weights


class GradVac(GramianWeighting):
    """Like PCGrad, but each pair of tasks has a target cosine similarity ``φ̂ᵢⱼ`` (an exponential moving average
    of the observed cosines, from 0): when ``cos(gᵢ, gⱼ) = φ < φ̂ᵢⱼ``, ``gᵢ`` gains
    ``‖gᵢ‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖gⱼ‖√(1−φ̂²))·gⱼ``, which sets the cosine to ``φ̂``. Computed on
    coefficients in the span of the gradients (from ``G`` alone); weights are ≥ 0. The targets are a buffer
    updated in training mode, with the observed cosine of the (partly altered) ``gᵢ`` and ``gⱼ`` as in the
    authors' algorithm; other tasks are visited in a random order (``seed`` and a draw counter).

    Args:
        beta: EMA rate of the target cosines (paper: 0.01 – 0.5; LibMTL: 0.5).
        seed: seed of the visiting orders.
        gramian: Gramian backend.
    """

    stochastic = True
    target: Tensor

    def __init__(
        self, task_names: Sequence[str], /, *, beta: float = 0.5, seed: int = 0, gramian: str = "auto"
    ) -> None:
        super().__init__(task_names, gramian=gramian)
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ConfigError(f"`beta` must be in (0, 1]. Got {beta!r}.")
        self.beta = float(beta)
        self.draws = Draws(seed)
        self.register_buffer("target", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        g = as_numpy(gramian)
        m = self.num_tasks
        rng = self.draws.next()
        target = self.target.cpu().numpy().copy()
        coef = np.eye(m)
        for i in range(m):
            c = coef[i]
            for j in rng.permutation(m).tolist():
                if j == i or g[j, j] <= 0.0:
                    continue
                norm_i = float(np.sqrt(max(c @ g @ c, 0.0)))
                if norm_i <= 0.0:
                    continue
                norm_j = float(np.sqrt(g[j, j]))
                phi = float(np.clip((c @ g[:, j]) / (norm_i * norm_j), -1.0, 1.0))
                goal = float(target[i, j])
                if phi < goal - 1e-9:  # not rounding noise between identical gradients
                    c[j] += norm_i * (goal * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - goal**2)) / (
                        norm_j * np.sqrt(max(1 - goal**2, 1e-12)))
                target[i, j] = (1 - self.beta) * goal + self.beta * phi
        if self.training:
            self.target.copy_(torch.from_numpy(target).to(self.target.device))
        return to_weights(coef.sum(0), losses)
