"""STCH: smooth Tchebycheff scalarisation.

Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
ICML 2024.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._base import Weighting
from mtml.weighting._si import check_log_options, shifted_losses


def _count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"`{key}` must be an integer >= 0 (training steps). Got {value!r}.")
    return value


class STCH(Weighting):
    """Minimises a smooth maximum of the normalised log-losses,
    ``S = m·μ·log Σᵢ exp(log(Dᵢ/nᵢ)/μ)`` with ``Dᵢ = Lᵢ − min_loss + ε``; its gradient gives the weights
    ``wᵢ = ∂S/∂Lᵢ = m·pᵢ/Dᵢ`` with ``p = softmax(log(D/n)/μ)`` (detached). As μ → 0, S tends to m times the
    Tchebycheff (worst-task) value ``maxᵢ log(Dᵢ/nᵢ)``; at μ = 1, ``w ∝ 1/n``.

    This follows the authors' multi-task code (also LibMTL's ``STCH``): the objectives are log-losses normalised
    by a nadir point ``n`` (ideal point 0 and preference λ = 1 in the paper's ``μ log Σ exp(λᵢ(fᵢ − zᵢ*)/μ)``), and
    training starts with a warm-up on ``Σ log Dᵢ`` (weights ``1/Dᵢ``, as SI): ``warmup`` steps, then
    ``nadir_steps`` more during which ``n`` accumulates as the mean of ``D`` (the authors: 4 epochs, then the
    mean loss of a 5th). ``nadir_steps = 0`` sets ``n = 1``. Steps are calls in training mode (micro-batches);
    the step counter, the running sum and ``n`` are buffers, so checkpoints carry them. In eval mode nothing is
    updated. A loss below ``min_loss`` raises :class:`~mtml.errors.ConfigError`.

    Args:
        mu: smoothing μ > 0 (authors' default 1).
        warmup: log-loss steps before the nadir point starts accumulating.
        nadir_steps: log-loss steps whose mean loss is the nadir point.
        min_loss: lower bound of the losses (0 for non-negative losses).
        eps: ε > 0 added to every loss.
    """

    steps: Tensor
    total: Tensor
    nadir: Tensor

    def __init__(self, task_names: Sequence[str], /, *, mu: float = 1.0, warmup: int = 200, nadir_steps: int = 50,
                 min_loss: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(task_names)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 < mu < float("inf"):
            raise ConfigError(f"`mu` must be a finite number > 0. Got {mu!r}.")
        self.mu = float(mu)
        self.warmup, self.nadir_steps = _count("warmup", warmup), _count("nadir_steps", nadir_steps)
        self.min_loss, self.eps = check_log_options(min_loss, eps)
        m = self.num_tasks
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("total", torch.zeros(m, dtype=torch.float64))
        # 0 = not set yet (a set nadir point is a mean of losses shifted to > 0); not NaN: a checkpoint holding NaN
        # is refused as diverged
        self.register_buffer("nadir", torch.zeros(m, dtype=torch.float64))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        d = shifted_losses("stch", self.task_names, losses, self.min_loss, self.eps).to(self.total.device)
        if self.training:
            if not bool(self.nadir.all()) and int(self.steps) >= self.warmup + self.nadir_steps:
                self.nadir.copy_(self.total / self.nadir_steps if self.nadir_steps else torch.ones_like(d))
            if not bool(self.nadir.all()) and int(self.steps) >= self.warmup:
                self.total += d
            self.steps += 1
        if not bool(self.nadir.all()):
            return (1.0 / d).to(losses)
        p = torch.softmax((d / self.nadir).log() / self.mu, 0)
        return (self.num_tasks * p / d).to(losses)

    def extra_repr(self) -> str:
        return (f"tasks={self.num_tasks}, mu={self.mu:g}, warmup={self.warmup}, nadir_steps={self.nadir_steps}, "
                f"min_loss={self.min_loss:g}, eps={self.eps:g}")
