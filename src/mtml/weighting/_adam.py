"""A tiny Adam whose state lives in buffers, for weightings that learn their own logits (GradNorm, FAMO)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BufferAdam"]


class BufferAdam(nn.Module):
    """Adam (Kingma & Ba 2015, with L2 ``weight_decay`` added to the gradient) on a buffer ``[m]``.

    The moments and the step count are buffers, so a checkpoint of the owning weighting resumes exactly.
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor

    def __init__(self, size: int, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.register_buffer("exp_avg", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("exp_avg_sq", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def step(self, param: Tensor, grad: Tensor) -> None:
        """Update ``param`` in place from ``grad`` (both ``[m]``)."""
        grad = grad.to(self.exp_avg) + self.weight_decay * param.to(self.exp_avg)
        b1, b2 = self.betas
        self.steps += 1
        t = int(self.steps)
        self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.exp_avg_sq / (1 - b2**t)).sqrt_().add_(self.eps)
        param.sub_((self.lr / (1 - b1**t)) * self.exp_avg / denom)
