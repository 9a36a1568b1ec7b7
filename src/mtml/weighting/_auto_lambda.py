"""Auto-Lambda: task weights learned by a one-step look-ahead on validation data.

Liu, Li, Kuang, Xie, Lin & Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtml.errors import ConfigError
from mtml.weighting._adam import BufferAdam
from mtml.weighting._base import BilevelWeighting

__all__ = ["AutoLambda"]


class AutoLambda(BilevelWeighting):
    """Task weights λ that minimise the validation loss of the primary tasks one training step ahead.

    Before every ``update_every``-th training update, with the training batch and a validation batch:

    1. virtual step: ``θ' = θ − α·∇_θ Σᵢ λᵢ·Lᵢ(θ; train)`` over every trained model parameter, α the
       optimiser's current learning rate (a plain SGD step: the optimiser's momentum, Adam scaling and weight
       decay are left out of the look-ahead);
    2. ``d = ∇_θ' Σ_{i∈P} Lᵢ(θ'; val)`` for the primary tasks P (all tasks by default: the multi-task setting);
    3. as ``θ'`` is linear in λ, ``∂L_P(θ')/∂λᵢ = −α·∇Lᵢ(θ; train)·d``, the mixed second derivative of the
       training objective applied to ``d``; it is approximated by the central difference
       ``−α·(Lᵢ(θ + εd) − Lᵢ(θ − εd)) / 2ε`` with ``ε = fd_scale / ‖d‖`` (two forward passes, no second-order
       autograd), as in the paper;
    4. λ takes one Adam step with that gradient (its moments are buffers).

    The model's parameters and buffers are restored exactly afterwards. λ is unconstrained (it may leave
    ``[0, ∞)``), as in the paper's code. Cost of an update: three forward and two backward passes on top of
    the training step's one of each.

    Args:
        init: the initial weight of every task (paper: 0.1).
        lr: Adam's learning rate for λ (paper: 1e-4 on NYUv2, 3e-5 on Cityscapes, 3e-4 on CIFAR-100).
        update_every: update λ before every ``update_every``-th training update.
        primary: the tasks whose validation loss λ minimises (auxiliary learning); default all tasks.
        fd_scale: the finite-difference step ``‖εd‖`` (paper: 0.01).
    """

    nonnegative: ClassVar[bool] = False
    lambdas: Tensor
    primary_mask: Tensor

    def __init__(self, task_names: Sequence[str], /, *, init: float = 0.1, lr: float = 1e-4, update_every: int = 1,
                 primary: Sequence[str] | None = None, fd_scale: float = 0.01) -> None:
        super().__init__(task_names, update_every=update_every)
        for key, value in (("init", init), ("lr", lr), ("fd_scale", fd_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"`{key}` must be a finite number > 0. Got {value!r}.")
        if isinstance(primary, str):
            primary = [primary]
        names = self.task_names
        chosen = list(names) if primary is None else list(primary)
        unknown = [p for p in chosen if p not in names]
        if not chosen or unknown:
            raise ConfigError(f"`primary` must be a non-empty list of task names (of {', '.join(names)}). "
                              f"Got {primary!r}.")
        self.primary = [n for n in names if n in chosen]
        self.init, self.fd_scale = float(init), float(fd_scale)
        m = self.num_tasks
        self.register_buffer("lambdas", torch.full((m,), float(init), dtype=torch.float64))
        self.register_buffer("primary_mask", torch.tensor([float(n in chosen) for n in names], dtype=torch.float64))
        self.adam = BufferAdam(m, lr=float(lr))

    def weights(self, losses: Tensor, gramian: Tensor | None) -> Tensor:
        return self.lambdas.to(losses.dtype).detach().clone()

    def hypergradient(self, model: nn.Module, train_batch: Any, val_batch: Any, loss_fn: Callable[[Any], Tensor],
                      lr: float) -> Tensor:
        """``[m]``: the finite-difference estimate of ``∂ Σ_{i∈P} Lᵢ(θ'; val) / ∂λ`` (steps 1-3); ``model`` is
        left unchanged."""
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in model.buffers()]
        try:
            losses = loss_fn(train_batch)
            grads = _grads((self.lambdas.to(losses) * losses).sum(), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=lr)
            val = loss_fn(val_batch)
            d = _grads((self.primary_mask.to(val) * val).sum(), params)
            norm = float(torch.sqrt(sum(((g.double() ** 2).sum() for g in d), torch.zeros((), dtype=torch.float64))))
            if not norm > 0 or not math.isfinite(norm):
                return torch.zeros_like(self.lambdas)
            eps = self.fd_scale / norm
            ends = []
            with torch.no_grad():
                for sign in (1.0, -1.0):
                    for p, s, g in zip(params, saved, d, strict=True):
                        p.copy_(s).add_(g, alpha=sign * eps)
                    ends.append(loss_fn(train_batch).detach().to(self.lambdas))
            return -lr * (ends[0] - ends[1]) / (2 * eps)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
                for b, s in zip(model.buffers(), buffers, strict=True):
                    b.copy_(s)

    def update(self, model: nn.Module, train_batch: Any, val_batch: Any, loss_fn: Callable[[Any], Tensor],
               lr: float) -> None:
        """One Adam step of λ along :meth:`hypergradient` (a non-finite estimate leaves λ as it is)."""
        grad = self.hypergradient(model, train_batch, val_batch, loss_fn, lr)
        if torch.isfinite(grad).all():
            self.adam.step(self.lambdas, grad)

    def extra_repr(self) -> str:
        return (f"tasks={self.num_tasks}, init={self.init}, lr={self.adam.lr}, update_every={self.update_every}, "
                f"primary={self.primary}")


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``∇loss`` for every tensor of ``params`` (zeros where it does not reach)."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
