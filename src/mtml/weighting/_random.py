"""Checkpointable randomness for randomised weightings: a seed plus a draw counter kept in a buffer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtml.errors import ConfigError

__all__ = ["Draws"]


class Draws(nn.Module):
    """The ``k``-th call gets ``numpy.random.default_rng([seed, k])``: no global RNG, and a checkpoint (the
    ``count`` buffer) resumes the exact sequence.

    Args:
        seed: any integer ≥ 0.
    """

    count: torch.Tensor

    def __init__(self, seed: int) -> None:
        super().__init__()
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"`seed` must be an integer >= 0. Got {seed!r}.")
        self.seed = seed
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def next(self) -> np.random.Generator:
        rng = np.random.default_rng([self.seed, int(self.count)])
        self.count += 1
        return rng
