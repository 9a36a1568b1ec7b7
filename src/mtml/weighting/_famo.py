"""FAMO: fast adaptive multitask optimisation.

Liu, Liang, Gong, Lv, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtml.errors import ConfigError
from mtml.weighting._adam import BufferAdam
from mtml.weighting._base import Weighting


class FAMO(Weighting):
    """Decreases every log-loss at a balanced rate with O(1) cost: no per-task gradients.

    With ``z = softmax(ξ)`` and ``Dᵢ = Lᵢ − min_loss + ε``, the update follows ``Σᵢ zᵢ·log Dᵢ`` rescaled by
    ``c = (Σᵢ zᵢ/Dᵢ)⁻¹``: weights ``wᵢ = c·zᵢ/Dᵢ`` (they sum to 1). The logits ξ learn from
    how much each log-loss fell: in training mode, before weighting step t, ξ takes one Adam step (buffers;
    weight decay γ) with gradient ``∇_ξ zᵀ(log D(t−1) − log D(t))`` — the paper's rule with this step's batch
    standing in for a re-evaluation of the previous batch. Weights are detached.

    Args:
        lr: learning rate of ξ (paper: 0.025).
        gamma: weight decay of ξ (paper: 0.001).
        min_loss: lower bound of the losses (0 for non-negative losses).
        eps: ε inside the logarithm.
    """

    logits: Tensor
    previous: Tensor

    def __init__(self, task_names: Sequence[str], /, *, lr: float = 0.025, gamma: float = 0.001,
                 min_loss: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(task_names)
        for key, value, low in (("lr", lr, 0.0), ("gamma", gamma, None), ("eps", eps, 0.0)):
            ok = isinstance(value, (int, float)) and value < float("inf")
            if not ok or (low is not None and not value > low) or value < 0:
                raise ConfigError(f"`{key}` must be a finite number {'> 0' if low is not None else '>= 0'}. "
                                  f"Got {value!r}.")
        self.min_loss = float(min_loss)
        self.eps = float(eps)
        m = self.num_tasks
        self.register_buffer("logits", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("previous", torch.zeros(m, dtype=torch.float64))  # 0: no step yet (d > 0); not NaN,
        # which a checkpoint refuses as diverged
        self.adam = BufferAdam(m, lr=float(lr), weight_decay=float(gamma))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        d = (losses.detach().to(self.logits) - self.min_loss).clamp_min(0.0) + self.eps
        if self.training:
            if bool(self.previous.all()):
                z = torch.softmax(self.logits, 0)
                delta = self.previous.log() - d.log()
                self.adam.step(self.logits, z * (delta - (z * delta).sum()))  # softmax Jacobian-vector product
            self.previous.copy_(d)
        z = torch.softmax(self.logits, 0)
        w = z / d
        return (w / w.sum()).to(losses)
