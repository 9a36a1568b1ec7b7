"""Dynamic Weight Average.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import Weighting


class DWA(Weighting):
    """``wᵢ(t) = m·softmax(rᵢ(t−1)/T)`` with ``rᵢ(t−1) = L̄ᵢ(t−1) / L̄ᵢ(t−2)``.

    ``L̄ᵢ(t)`` is task i's mean training loss over period t (``period`` optimiser steps, the paper's epoch).
    For the first two periods the weights are 1. The running sums live in buffers, so checkpoints carry them.

    Args:
        temperature: softness T of the softmax (paper: 2).
        period: steps per averaging period.
    """

    running: Tensor
    count: Tensor
    history: Tensor
    current: Tensor

    def __init__(self, task_names: Sequence[str], /, *, temperature: float = 2.0, period: int = 50) -> None:
        super().__init__(task_names)
        if not temperature > 0:
            raise ConfigError(f"dwa: temperature must be > 0. Got {temperature}.")
        if period < 1:
            raise ConfigError(f"dwa: period must be >= 1. Got {period}.")
        self.temperature = float(temperature)
        self.period = int(period)
        m = self.num_tasks
        self.register_buffer("running", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # 0 = no finished period yet (period means of losses are > 0); not NaN: a checkpoint holding NaN is refused
        # as diverged
        self.register_buffer("history", torch.zeros((2, m), dtype=torch.float64))
        self.register_buffer("current", torch.ones(m))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        weights = self.current.to(losses).clone()  # from finished periods only: this step's loss counts next
        if self.training:
            self._observe(losses.detach())
        return weights

    def _observe(self, losses: Tensor) -> None:
        self.running += losses.to(self.running)
        self.count += 1
        if int(self.count) < self.period:
            return
        mean = self.running / self.count
        self.history[0] = self.history[1]
        self.history[1] = mean
        self.running.zero_()
        self.count.zero_()
        if bool((self.history > 0).all()):
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)
            self.current.copy_(self.num_tasks * torch.softmax(ratio / self.temperature, 0))
