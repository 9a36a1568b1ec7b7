"""Nash-MTL: multi-task learning as a bargaining game.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a Bargaining Game",
ICML 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import GramianWeighting
from mtml.weighting._solvers import as_numpy, nash_bargaining, to_weights


class NashMTL(GramianWeighting):
    """The Nash bargaining solution: ``d = Σ αᵢgᵢ`` with ``αᵢ·(Gα)ᵢ = 1`` — each task's utility ``gᵢᵀd`` is
    inversely proportional to its weight. Solved by damped Newton on a strictly convex potential
    (:func:`~mtml.weighting._solvers.nash_bargaining`), warm-started from the previous solution (a buffer);
    the paper's code runs a sequence of cvxpy problems instead.

    As in the paper's code the update is clipped to norm ``max_norm``: when ``‖Σαᵢgᵢ‖ = √(αᵀGα)`` exceeds it,
    α is scaled down (this scales the heads' gradients too, unlike the paper's code, which clips only the shared
    parameters' gradient). Tasks whose shared gradient is 0 take no part in the bargain and get the mean of
    the others' weights (1 when every gradient is 0). Weights are recomputed every ``update_every`` steps.

    Args:
        max_norm: clip norm of the combined shared gradient (0: no clipping; paper's code: 1).
        update_every: steps between recomputations of α (paper's code: 1 or more).
        gramian: Gramian backend.
    """

    permutation_equivariant = True
    previous: Tensor
    last: Tensor
    step: Tensor

    def __init__(self, task_names: Sequence[str], /, *, max_norm: float = 1.0, update_every: int = 1,
                 gramian: str = "auto") -> None:
        super().__init__(task_names, gramian=gramian)
        if not (isinstance(max_norm, (int, float)) and 0.0 <= max_norm < float("inf")):
            raise ConfigError(f"`max_norm` must be a finite number >= 0. Got {max_norm!r}.")
        if not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"`update_every` must be an integer >= 1. Got {update_every!r}.")
        self.max_norm = float(max_norm)
        self.update_every = update_every
        m = self.num_tasks
        self.register_buffer("previous", torch.zeros(m, dtype=torch.float64))  # warm start, units of G
        self.register_buffer("last", torch.ones(m, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        assert gramian is not None
        if self.training and int(self.step) % self.update_every != 0:
            self.step += 1
            return to_weights(self.last.cpu().numpy(), losses)
        g = as_numpy(gramian)
        diag = np.diag(g)
        active = diag > 1e-12 * max(float(diag.max()), 1e-300)
        w = np.ones(self.num_tasks)
        if active.any():
            sub = g[np.ix_(active, active)]
            start = self.previous.cpu().numpy()[active]
            alpha = nash_bargaining(sub, start if np.all(start > 0) else None)
            solved = alpha.copy()
            norm = float(np.sqrt(max(float(alpha @ sub @ alpha), 0.0)))
            if self.max_norm > 0 and norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
            w[active] = alpha
            w[~active] = alpha.mean()
            if self.training:
                prev = np.zeros(self.num_tasks)
                prev[active] = solved
                self.previous.copy_(torch.from_numpy(prev).to(self.previous.device))
        if self.training:
            self.last.copy_(torch.from_numpy(w).to(self.last.device))
            self.step += 1
        return to_weights(w, losses)
