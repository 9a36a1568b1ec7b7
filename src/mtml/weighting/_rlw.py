"""RLW: random loss weighting.

Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", TMLR 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import Weighting
from mtml.weighting._random import Draws
from mtml.weighting._solvers import to_weights

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


class RLW(Weighting):
    """Fresh random weights every step: ``w = m·softmax(z)``, ``z ~ N(0, I)`` (``normal``, the paper's default);
    ``uniform`` draws ``z ~ U(0, 1)``; ``dirichlet`` draws ``w/m ~ Dir(1)``. Scaled by m so that the weights
    average 1 like ``equal``'s. Draws come from ``seed`` and a counter kept in a buffer (checkpointable).

    Args:
        distribution: ``normal``, ``uniform`` or ``dirichlet``.
        seed: seed of the draws.
    """

    stochastic = True

    def __init__(self, task_names: Sequence[str], /, *, distribution: str = "normal", seed: int = 0) -> None:
        super().__init__(task_names)
        if distribution not in _DISTRIBUTIONS:
            raise ConfigError(f"`distribution` must be one of {', '.join(_DISTRIBUTIONS)}. Got {distribution!r}.")
        self.distribution = distribution
        self.draws = Draws(seed)

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        m = self.num_tasks
        rng = self.draws.next()
        if self.distribution == "dirichlet":
            return to_weights(m * rng.dirichlet(np.ones(m)), losses)
        z = rng.standard_normal(m) if self.distribution == "normal" else rng.uniform(size=m)
        e = np.exp(z - z.max())
        return to_weights(m * e / e.sum(), losses)
